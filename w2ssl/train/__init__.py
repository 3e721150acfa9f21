"""Pre-training: the trainer and the rules for resuming it."""
