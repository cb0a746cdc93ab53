"""Export a run: merged HF model, GGUF, Ollama Modelfile."""
