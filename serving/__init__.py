"""The OpenAI-compatible HTTP server: a thin Starlette app in front of the elastic engine."""
