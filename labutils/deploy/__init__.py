"""Deployment (08-Deploy): GGUF export for llama.cpp, llama.cpp as an engine, the lab's server with its dense
fallback and metrics, and the load test."""
