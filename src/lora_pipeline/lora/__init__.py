"""Plain-Python ML layer (no Kedro imports): usable from a notebook or another project."""
