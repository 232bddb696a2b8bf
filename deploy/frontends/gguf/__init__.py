"""GGUF files (llama.cpp's format): metadata, tensors and the tokenizer, read with the `gguf` package."""
