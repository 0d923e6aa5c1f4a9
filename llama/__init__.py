"""A from-scratch, study-grade PyTorch implementation of Meta's LLaMA family."""

from .chat_format import Llama2ChatFormat, Llama3ChatFormat, chat_format_for
from .config import ModelArgs, RopeScaling, list_models
from .model import AttentionExtension, Transformer
from .tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer

__all__ = ["ModelArgs", "RopeScaling", "Transformer", "AttentionExtension", "list_models",
           "Tokenizer", "SentencePieceTokenizer", "TiktokenTokenizer",
           "Llama2ChatFormat", "Llama3ChatFormat", "chat_format_for"]
