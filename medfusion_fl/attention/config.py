"""The `attention.*` keys: which attention supervision a run trains with, and how strongly."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medfusion_fl.config_base import Section

Method = Literal["none", "mask", "cam", "consistency"]


class AttentionConfig(Section):
    method: Method = Field(
        "none", description="Attention supervision: 'mask' pulls the model's spatial attention toward each "
        "patient's lesion mask (manifest column <view>-mask), 'cam' penalises the share of the attention outside "
        "the mask, 'consistency' makes the attention of a view and of its mirror image agree (no mask needed); "
        "'none': no gate, the plain model. Patients without a mask train on the classification loss only.")
    weight: float = Field(5.0, ge=0.0, le=100.0, description="Weight of the attention loss added to each "
                          "patient's classification loss (under DP the sum is clipped per patient); 5 served all "
                          "three methods in bench/attention_shortcut.py, where 1 left the attention half-learnt.")
    min_side: int = Field(7, ge=1, le=512, description="The attention sits on the deepest backbone stage whose "
                          "map has at least this many cells a side (a 224 px ResNet: its last stage, 7 x 7; a "
                          "32 px one: 8 x 8 after its first stage); finer maps locate more, deeper ones mean more.")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def needs_masks(self) -> bool:
        return self.method in ("mask", "cam")


def unsupported(attention: AttentionConfig, *, views: int, depth: int, dp_engine: str | None, cuda_graphs: bool,
                checkpointing: bool) -> str | None:
    """Why this attention supervision cannot run in a run of `views` image views (depth: 3D), per-patient DP
    by `dp_engine` (None: no DP) and these model settings (a ConfigError's text), or None."""
    if not attention.enabled:
        return None
    key = f"attention.method = {attention.method!r}"
    if not views:
        return f"{key} supervises where the model looks in its image views; this run has none (data.view-names)."
    if depth:
        return (f"{key}: attention supervision covers 2D views; this run reads 3D volumes (data.depth = {depth}). "
                "Set attention.method = 'none'.")
    if dp_engine is not None and cuda_graphs:
        return f"{key} with privacy.cuda-graphs = true is not supported; set privacy.cuda-graphs = false."
    if dp_engine == "opacus" and attention.method == "consistency":
        return (f"{key} passes each view and its mirror image through the backbone in one call, which Opacus' "
                "hooks would count as two patients; use privacy.engine = 'bookkeeping' (the default).")
    if dp_engine == "opacus" and checkpointing:
        return (f"{key} with privacy.engine = 'opacus' and model.checkpointing = true is not supported (the "
                "backbone runs once per view there); use privacy.engine = 'bookkeeping' (the default).")
    return None
