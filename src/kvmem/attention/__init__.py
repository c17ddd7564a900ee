"""Attention over the KV-cache layouts: a plain-torch reference and faster backends."""
