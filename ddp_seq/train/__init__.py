"""The Trainer and the pieces of a training step: checkpoints, resume, objectives, optimizer,
precision, evaluation, step timing (see README.md)."""
