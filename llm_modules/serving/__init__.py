"""Serving saved modules over HTTP: an OpenAI-compatible API and a web chat (`llm-modules serve`)."""
