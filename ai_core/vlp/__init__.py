"""The organ-level vision-language model: spec, architecture, pooling heads, text tower, checkpoints."""
