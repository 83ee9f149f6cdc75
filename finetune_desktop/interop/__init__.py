"""The way out: GGUF export (llama.cpp, Ollama, LM Studio), HF/PEFT copies, a TRL + PEFT +
accelerate job for GPUs, and importing that job's result as a normal run folder.

Library code only: no Qt, no command line. User-facing problems raise InteropError."""
from .errors import InteropError

__all__ = ["InteropError"]
