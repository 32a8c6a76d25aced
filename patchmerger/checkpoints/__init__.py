"""Checkpoints in and out: the orbax manager (save, restore, resume, list steps, read
parameters), layouts (detect, convert), strict loading, export."""
