"""Shared machinery with no ML domain of its own: atomic files, caches, checkpoints, model loading, the trainer core."""
