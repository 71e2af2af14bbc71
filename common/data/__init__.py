"""Dataset readers for the public layouts, synthetic generators writing those layouts, and I/O helpers."""
