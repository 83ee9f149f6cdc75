"""Finetune Desktop: fine-tune a small language model on your own computer and watch it learn."""
__version__ = "0.1.0"
