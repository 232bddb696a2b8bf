"""Hugging Face checkpoint directories: config.json, safetensors weights (one file or shards with
their index), tokenizer.json, tokenizer_config.json and generation_config.json, read without torch."""
