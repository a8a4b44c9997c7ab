"""Training engine: the trainer loop, checkpoints, LR schedules and the callback interface."""
