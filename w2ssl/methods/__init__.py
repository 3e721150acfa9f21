"""Self-supervised methods (W2SSL, MoCo v3, BYOL) and their parts: the model contract, montages, heads, EMA.

A method plugs into the trainer through :mod:`w2ssl.methods.registry` (one module per method that calls
``register_method``). The registry is not imported here: ``w2ssl.dist`` imports parts of this package.
"""
