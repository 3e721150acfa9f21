"""Backbones that map images to feature maps."""
