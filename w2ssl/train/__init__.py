"""Pre-training: the trainer, its optimiser and schedules, logging, and keeping a run alive."""
