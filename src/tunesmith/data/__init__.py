"""Data loading, preflight validation and batching."""
