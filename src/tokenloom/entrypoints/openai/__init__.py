"""The OpenAI-compatible HTTP server: protocol models, serving, FastAPI app, metrics."""
