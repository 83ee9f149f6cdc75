"""The numpy transformer engine: no Qt, no file formats other than checkpoints and tokenizers."""
from .config import ModelConfig, ModelFormatError
from .lora import LoraConfig
from .model import Model

__all__ = ["Model", "ModelConfig", "ModelFormatError", "LoraConfig", "Tokenizer"]


def __getattr__(name):
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(name)
