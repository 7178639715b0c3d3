"""Streaming metrics: per-example scores at most, never whole-set logits of larger shape."""
