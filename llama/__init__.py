"""A from-scratch, study-grade PyTorch implementation of Meta's LLaMA family."""

from .chat_format import Llama2ChatFormat, Llama3ChatFormat, Llama4ChatFormat, chat_format_for
from .config import Llama4VisionArgs, ModelArgs, MoEArgs, RopeScaling, list_models
from .formats import CheckpointError, detect_format, load, save
from .generate import generate
from .model import AttentionExtension, Transformer
from .quantize import quantize_int8
from .registry import build
from .tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from .vision.llama4_model import Llama4Multimodal
from .vision.mllama import MllamaTransformer, cross_attention_mask_from_tokens
from .vision.mllama_config import MllamaArgs, MllamaVisionArgs

__all__ = ["ModelArgs", "MoEArgs", "RopeScaling", "Transformer", "AttentionExtension", "list_models",
           "quantize_int8", "load", "save", "detect_format", "CheckpointError", "generate", "build",
           "Tokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "HFTokenizer",
           "Llama2ChatFormat", "Llama3ChatFormat", "Llama4ChatFormat", "chat_format_for",
           "Llama4VisionArgs", "Llama4Multimodal", "MllamaArgs", "MllamaVisionArgs", "MllamaTransformer",
           "cross_attention_mask_from_tokens"]
