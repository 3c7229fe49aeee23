"""HF safetensors <-> lcinfer (orbax) checkpoints, and tokenizers. No torch, no pickle."""

from lcinfer.checkpoint.convert import convert, export, is_converted
from lcinfer.checkpoint.tokenizer import Tokenizer

__all__ = ["convert", "export", "is_converted", "Tokenizer"]
