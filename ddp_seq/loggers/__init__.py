"""What a run prints and records: the run log, metrics records, wandb, TensorBoard and the
end-of-run report (see README.md)."""
