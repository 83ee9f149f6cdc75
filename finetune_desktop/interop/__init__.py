"""Ways in and out: GGUF export for llama.cpp, Ollama and LM Studio; a TRL job for GPUs and importing its result."""
