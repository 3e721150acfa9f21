"""Loss functions, each a pure function in its own module."""
