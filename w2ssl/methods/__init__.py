"""Self-supervised methods (W2SSL, MoCo v3) and their parts: montages, heads, momentum encoders."""
