"""Training: feature cache for frozen-backbone stages, the stage loop, checkpoints, schedules."""
