"""A from-scratch, study-grade PyTorch implementation of Meta's LLaMA family."""

from .chat_format import Llama2ChatFormat, Llama3ChatFormat, Llama4ChatFormat, chat_format_for
from .config import ModelArgs, MoEArgs, RopeScaling, list_models
from .formats import CheckpointError, detect_format, load, save
from .generate import generate
from .model import AttentionExtension, Transformer
from .quantize import quantize_int8
from .registry import build
from .tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from .vision import MllamaArgs, MllamaTransformer, MllamaVisionArgs

__all__ = ["ModelArgs", "MoEArgs", "RopeScaling", "Transformer", "AttentionExtension", "list_models",
           "quantize_int8", "load", "save", "detect_format", "CheckpointError", "generate",
           "Tokenizer", "SentencePieceTokenizer", "TiktokenTokenizer",
           "Llama2ChatFormat", "Llama3ChatFormat", "Llama4ChatFormat", "chat_format_for", "build",
           "MllamaArgs", "MllamaVisionArgs", "MllamaTransformer"]
