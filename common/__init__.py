"""Shared library of the cardiac bundle collection: ops, networks, losses, metrics, transforms, data, engines."""
