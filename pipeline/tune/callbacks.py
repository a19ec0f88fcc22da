"""What a sweep trial's Train workers report to Ray Tune (imports Ray: load it in the trial only)."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


class ReportsBeforeLastStep(TuneReportCallback):
    """The workers' reports, forwarded to Tune, except the last step's: the trial reports that itself
    once its run has exported the model and ended its MLflow run. A scheduler whose top rung is the
    last step (ASHA with max_steps / grace_period a power of its reduction factor) would otherwise
    stop the trial mid-export."""

    def __init__(self, last_step: int):
        super().__init__()
        self.last_step = last_step

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and metrics[0].get("step") == self.last_step:
            return
        super().after_report(run_context, metrics, checkpoint)
