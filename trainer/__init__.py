"""The midfill trainer: the torchrun entry point and everything a training process needs."""
