"""The frozen reference model: scorer, statistics, cache and Ray actor group."""
