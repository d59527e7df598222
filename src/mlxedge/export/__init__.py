"""Writers for other runtimes' formats (GGUF for llama.cpp and Ollama)."""
