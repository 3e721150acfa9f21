"""Processes: launch modes, collectives, synchronised and per-view BatchNorm (no method in here)."""
