"""The OpenAI-compatible HTTP server: protocol, app, metrics, launcher."""
