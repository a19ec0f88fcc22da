"""Entry points, one per stage: ``python -m jobs.<name> --help``."""
