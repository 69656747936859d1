"""Serving: `eve chat` and the OpenAI-compatible `eve serve` (engine, prompt building, media, web page)."""
