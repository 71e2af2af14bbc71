"""Simulators writing synthetic datasets in the public datasets' own layouts, with ground truth."""
