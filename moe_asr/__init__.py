"""moe-asr: streaming Mixture-of-Experts U2++ speech recognition with expert parallelism."""

__version__ = "0.1.0"
