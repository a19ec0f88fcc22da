"""Distributed preference optimisation (DPO, TDPO) for language models on Ray.

Kept import-light on purpose: importing ``pipeline`` must not pull in Ray,
DeepSpeed or transformers. Import the submodule you need.
"""

__version__ = "0.1.0"
