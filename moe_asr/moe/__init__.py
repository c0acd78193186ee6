"""Mixture-of-Experts feed-forward layer: router, token dispatch and experts as separate pieces."""
