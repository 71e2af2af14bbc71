"""Simulators writing synthetic datasets in the public datasets' own layouts, with ground truth."""

from common.data.synthetic.phantom import simulate_phantom, write_phantom_h5

__all__ = ["simulate_phantom", "write_phantom_h5"]
