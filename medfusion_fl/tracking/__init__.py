"""Where a run's figures go besides metrics.jsonl: TensorBoard event files under `<run-dir>/tensorboard/`."""

from medfusion_fl.tracking.tensorboard import RunTracker, round_scalars

__all__ = ["RunTracker", "round_scalars"]
