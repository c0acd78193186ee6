"""A trained model, read back without DeepSpeed: everything after training starts here.

``load_model(path)`` takes a run directory, a DeepSpeed checkpoint directory
(any tag, ZeRO stage and ep_size) or a consolidated model file, and returns
the model with every expert and the experiment config it was trained with.
"""
from moe_asr.checkpoint.load import (FORMAT, LoadedModel, ModelState, build_trained_model, load_model,
                                    read_model_state, save_model)

__all__ = ["FORMAT", "LoadedModel", "ModelState", "build_trained_model", "load_model", "read_model_state",
           "save_model"]
