"""A training run's folder as a format: what the engine writes and everything after training reads.

The experiment config (``config.py``: ``train.yaml``), the checkpoint layout
and index (``layout.py``), DeepSpeed's model files and the safe reader of
every ``.pt`` (``files.py``) and the layout-free training state
(``training_state.py``). Nothing here imports DeepSpeed or the engine, so the
engine writes through these names and ``moe_asr.checkpoint`` and the tools
read through them without starting one.
"""
