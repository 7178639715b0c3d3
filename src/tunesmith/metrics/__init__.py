"""Evaluation metrics shared between task families."""
