"""Serving: a chat command and (planned) an OpenAI-compatible server."""
