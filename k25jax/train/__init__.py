"""Training: losses, train state and steps, loop, checkpointing, metrics."""
