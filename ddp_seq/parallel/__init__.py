"""Processes and devices: torchrun's environment read once into ``DistInfo``, the process group,
and how ``training.mode`` wraps the model (see README.md)."""
