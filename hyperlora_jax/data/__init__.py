"""Datasets (TFDS builders), the synthetic task and the input pipeline."""
