"""Global batches, per-rank shares and padding: ``BucketBatchSampler``, ``collate``,
``ShareDataset``, ``build_loader`` (see README.md); the built-in readers live in ``readers/``."""
