"""Model and tokenizer loading: see :mod:`pipeline.models.loading`."""
