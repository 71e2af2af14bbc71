"""Evaluation metrics, kept apart from the networks."""
