"""Loss functions, kept apart from the networks."""
