"""Generation-based evaluation, reward sources and reward-KL Pareto fronts."""
