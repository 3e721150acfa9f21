"""The shared runtime of every loop: the step, optimiser and parameter groups, monitor, guard, run state."""
