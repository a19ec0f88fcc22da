"""Ray Tune sweeps over the config (beta, alpha, loss, ...), MLflow parent/child runs, one reference pass."""
