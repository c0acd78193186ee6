"""ONNX export of a trained model with its MoE layers kept sparse (only the selected experts run).

``export_model(model, out_dir, ...)`` writes the full-context encoder + CTC,
the streaming chunk encoder (fixed-size caches in and out), the L2R and R2L
decoders for attention rescoring and, optionally, files for sherpa-onnx's
WeNet CTC model type; see docs/tools.md (`moe-asr export`).
"""
from moe_asr.export.bundle import DESCRIPTION, export_model
from moe_asr.export.sherpa import SherpaOptions

__all__ = ["DESCRIPTION", "SherpaOptions", "export_model"]
