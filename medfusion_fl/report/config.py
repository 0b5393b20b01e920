"""The `report.*` keys of a run: what the evaluation report holds and how long it may take."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medfusion_fl.config_base import Section


class ReportConfig(Section):
    """The evaluation report written beside model.onnx (report.html, evaluation.json, PNGs)."""

    enabled: bool = Field(True, description="Write the report at the end of a run and on `medfusion-fl export` "
                          "(it scores the held-out folder; without one it says so and keeps the per-round curves).")
    bootstrap: int = Field(1000, ge=0, le=100_000, description="Bootstrap resamples of the held-out patients for "
                           "the 95% intervals of AUROC and AUPRC (0 = no intervals); 1000 takes well under a second "
                           "for 300 patients.")
    explain_patients: int = Field(8, ge=0, le=256, description="Held-out patients whose views get class-activation "
                                  "maps in the report and TensorBoard (0 = none): positives first, then negatives.")
    cam_min_side: int = Field(7, ge=1, le=64, description="The maps use the deepest backbone stage whose feature "
                              "map is at least this many cells on a side (the last stage of a 32 px model is 1x1, "
                              "which localises nothing); 1 = always the last stage.")
    cam_method: Literal["hirescam", "gradcam"] = Field(
        "hirescam", description="Class-activation maps: hirescam = captum's gradient x activation summed over "
        "channels (HiResCAM), gradcam = captum's Grad-CAM. Both are equal on a pooled backbone's last stage; on an "
        "inner stage of a GroupNorm model Grad-CAM's weights average to about zero (pointing game on tests/explain's "
        "lesion patients: 31 of 32 hits for hirescam, 0 of 32 for gradcam).")
    reliability_bins: int = Field(10, ge=2, le=50, description="Equal-width confidence bins of the reliability "
                                  "diagram and of the expected calibration error (ECE).")
    intended_use: str = Field("", max_length=2000, description="The model card's intended use in the deployer's "
                              "words: the clinical question, the patients and the setting it is meant for. '' = the "
                              "statement for data.source: a synthetic run is a demonstration, a run on site folders "
                              "is for research until it is validated where it would be used.")
