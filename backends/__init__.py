"""Backends: one module per backend, each a translator (compile) and a normalizer (collect)."""
