"""The Llama-family model and its loaders (Hugging Face directories, GGUF files)."""
