"""The `init.*` keys: where the coordinator's initial global model comes from."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from medfusion_fl.config_base import Section

SHA256 = re.compile(r"^[0-9a-f]{64}$")


class InitConfig(Section):
    """The starting point of round 1. Only the coordinator reads these files or hubs; every site receives the
    resulting weights as round 1's arrays and never downloads or reads a weights file."""

    source: Literal["random", "timm", "file", "run"] = Field(
        "random", description="'random': model.backbone from scratch (seeded by train.seed). 'timm': the backbone's "
        "timm pretrained weights, through timm's own loader (its hub cache or the internet, at the coordinator "
        "only), or from the local file in init.path. 'file': a local .pt/.pth/.safetensors of the backbone or of "
        "the whole model (init.part). 'run': an earlier run's model, to continue a federation or fine-tune it "
        "with a new consortium: a checkpoint (round-NNNN.pt), a run folder (its newest checkpoint) or an export "
        "folder (model.safetensors with model_card.json); its data schema must be this run's.")
    path: str = Field("", max_length=4096, description="The file or folder of init.source timm (optional: timm's "
                      "pretrained file instead of its hub), file or run (required).")
    sha256: str = Field("", description="The SHA-256 (64 hex digits) init.path must have; another is refused. '' = "
                        "not checked, but computed and recorded in the model card either way.")
    part: Literal["auto", "backbone", "model"] = Field(
        "auto", description="What of the weights to take: 'backbone' (the image backbone only: the fusion and the "
        "head start from scratch), 'model' (everything; the model config must match), 'auto' (the whole model when "
        "the file holds one, else the backbone).")

    @model_validator(mode="after")
    def _consistent(self) -> InitConfig:
        if self.source in ("file", "run") and not self.path:
            raise ValueError(f"source = {self.source!r} needs path: the weights file or run folder to start from")
        if self.source == "random" and (self.path or self.sha256):
            raise ValueError("path and sha256 are set but source = 'random' reads no file; set source to 'timm', "
                             "'file' or 'run', or clear them")
        if self.sha256 and not SHA256.match(self.sha256):
            raise ValueError(f"sha256 = {self.sha256!r}: expected 64 lower-case hex digits (sha256sum FILE)")
        if self.sha256 and not self.path:
            raise ValueError("sha256 is set but path is empty: the hash checks init.path (timm's hub files are checked "
                             "by timm)")
        if self.source == "timm" and self.part == "model":
            raise ValueError("source = 'timm' gives backbone weights only; set part to 'auto' or 'backbone'")
        return self
