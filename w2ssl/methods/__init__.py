"""Self-supervised methods (W2SSL, MoCo v3) and their parts: montages, heads, momentum encoders.

A method plugs into the trainer through :mod:`w2ssl.methods.registry` (one module per method that calls
``register_method``). The registry is not imported here: ``w2ssl.dist`` imports parts of this package.
"""
