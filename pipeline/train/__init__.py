"""Training: the single-process step (step), batching (batches) and the local trainer (local)."""
