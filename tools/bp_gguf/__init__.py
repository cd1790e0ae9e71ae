"""bp-gguf: Hugging Face model directories to GGUF files llama.cpp and Ollama load, verified."""
