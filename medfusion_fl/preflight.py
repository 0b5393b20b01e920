"""What a run names beyond its own config, checked before any data is made or any process starts: a backbone
that exists for the data's shape, and an init.path that reads as what init.source says it is. Without this an
unknown backbone or a file that is not weights failed minutes later, after the sites' data was written. `simulate`
refuses on it at once; the console's start form shows each message beside its field."""

from __future__ import annotations

from pathlib import Path

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError, ModelError


def preflight(run: RunConfig) -> dict[str, str]:
    """Per run-config key, what is wrong with what it names; empty when the run can start."""
    from medfusion_fl.models.backbone import check_backbone
    from medfusion_fl.pretrained.origin import run_weights
    from medfusion_fl.pretrained.weights import checked_sha256, read_state

    errors: dict[str, str] = {}
    try:
        check_backbone(run.model.backbone, depth=run.data.depth, image_size=run.data.image_size)
    except (ConfigError, ModelError) as exc:
        errors["model.backbone"] = str(exc)
    init = run.init
    if init.path and init.source != "random":
        path = Path(init.path)
        try:
            if init.source == "run":
                run_weights(path)  # a checkpoint, a run folder or an export: read as the coordinator will
            else:
                checked_sha256(path, init.sha256)
                if init.source == "file":
                    read_state(path)  # tensors, never unpickled code
        except ConfigError as exc:
            errors["init.path"] = str(exc)
    return errors


def check_run(run: RunConfig) -> None:
    """preflight(), raised as one ConfigError naming every key."""
    errors = preflight(run)
    if errors:
        raise ConfigError("the run cannot start:\n" + "\n".join(f"  {key}: {why}" for key, why in errors.items()))
