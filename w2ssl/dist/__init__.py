"""Processes: launch modes, collectives, synchronised BatchNorm and the tile exchange."""
