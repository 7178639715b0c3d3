"""Checkpoint conversion into plain transformers folders (GGUF import); no torch at import time."""
