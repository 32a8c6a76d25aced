"""Checkpoints in and out: layouts (detect, convert), strict loading, export."""
