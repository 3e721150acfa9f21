"""Data: image folders, samplers and loaders, and the augmentations (PIL and GPU)."""
