"""KV-cache managers: one interface (base), one module per strategy."""
