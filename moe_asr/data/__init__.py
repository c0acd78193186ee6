"""Audio files -> WebDataset shards -> padded feature batches (see docs/data.md).

manifest (utterance lists) -> shards (tar write/read) -> pipeline (one worker's plan and
features: audio, features, batching, tokenizer) -> loader (DataLoader order, resume,
rank sync) -> batch (the Batch contract). cmvn is the offline companion.
"""
