"""Preference data: read (sources), normalise and validate (normalize), tokenize and collate (tokenization)."""
