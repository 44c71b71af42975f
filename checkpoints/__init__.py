"""Checkpoint loaders: GGUF files, Hugging Face directories and Orbax checkpoints, plus the tokenizer."""

from checkpoints.load import LoadedCheckpoint, default_model_path, load_checkpoint

__all__ = ["LoadedCheckpoint", "default_model_path", "load_checkpoint"]
