"""[train]: how each site trains the global model locally in a round (medfusion_fl.config gathers the sections)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medfusion_fl.config_base import Section


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated config value's items, stripped, empty ones dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


class TrainConfig(Section):
    local_epochs: int = Field(1, ge=1, description="Epochs over the site's data per round. 1 keeps a ~100-patient "
                              "site (6 DP steps a round) within the default budget of epsilon 8 for the default "
                              "3 rounds, evaluation releases included; tests/test_config.py checks that it fits.")
    batch_size: int = Field(16, ge=1, description="Patients per step.")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Local optimiser, fresh each round.")
    lr: float = Field(0.002, gt=0.0, le=10.0, description="Local learning rate (AdamW's 0.002 suits the noisy "
                      "DP-SGD gradient of small sites; docs/benchmarks.md has the levers measured).")
    weight_decay: float = Field(0.0001, ge=0.0, description="Decoupled weight decay.")
    seed: int = Field(0, ge=0, description="The run's seed: the global model's initial weights, each site's data "
                      "order and dropout (mixed with site and round), which sites a round samples, and under "
                      "privacy.secure-rng = false the sites' noise and sampling too. Same config and seed on one "
                      "machine: the same run.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast of local training: bf16 (CPU or GPU), fp16 (CUDA only, with a gradient "
        "scaler; refused under DP because loss scaling would scale the clipping bound).")
    freeze: str = Field("", description="Comma-separated parameter-name prefixes the sites do not train (e.g. "
                        "'image.backbones'): those weights stay the global model's, and under DP the clipping bound "
                        "and the noise fall on the rest only. Empty: train everything.")
    class_weights: str = Field("", description="One weight in (0, 1] per class, in data.classes order, on each "
                               "patient's clipped gradient (under DP, so one patient still moves the sum by at most "
                               "max-grad-norm) or loss. Clipping gives every patient an equal vote, so a model "
                               "drifts towards the sites' majority class; '0.45,1' balances 31% positives. Set it "
                               "from public knowledge of the prevalence, never from the sites' data. Empty: 1 each.")

    @field_validator("freeze")
    @classmethod
    def _prefixes(cls, value: str) -> str:
        if any(not part.replace(".", "").replace("_", "").isalnum() for part in split_list(value)):
            raise ValueError(f"{value!r}: give parameter-name prefixes such as 'image.backbones,image.project'")
        return value

    @field_validator("class_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        try:
            weights = [float(part) for part in split_list(value)]
        except ValueError:
            raise ValueError(f"{value!r}: give one number per class, comma-separated, e.g. '0.45,1'") from None
        if any(not 0.0 < w <= 1.0 for w in weights):
            raise ValueError(f"{value!r}: every weight must lie in (0, 1]; a weight above 1 would let one patient "
                             "move the clipped sum by more than max-grad-norm")
        return value

    @property
    def frozen(self) -> tuple[str, ...]:
        return split_list(self.freeze)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(float(part) for part in split_list(self.class_weights))
