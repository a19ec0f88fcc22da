"""The RLHF stages around preference optimisation: SFT, reward modelling, preference-pair generation."""
