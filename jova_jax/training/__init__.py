"""Training room: the loop, its state and steps, the objective, optimizer, checkpoints and metrics."""
