"""A from-scratch, study-grade PyTorch implementation of Meta's LLaMA family."""

from .config import ModelArgs, RopeScaling, list_models
from .model import AttentionExtension, Transformer

__all__ = ["ModelArgs", "RopeScaling", "Transformer", "AttentionExtension", "list_models"]
