"""Data: verified sources, datasets held as tensors, and task streams."""
