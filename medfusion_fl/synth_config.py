"""The `synth.*` keys: the synthetic hospitals `simulate` and `medfusion-fl synth` write (data/synthetic.py)."""

from __future__ import annotations

from pydantic import Field, field_validator

from medfusion_fl.config_base import Section


class SynthConfig(Section):
    patients_per_site: int = Field(120, ge=8, description="Patients in each synthetic site folder.")
    test_patients: int = Field(300, ge=8, description="Patients in the synthetic held-out test folder.")
    dirichlet_alpha: float = Field(1.0, gt=0.0, description="Label skew across sites; small = more skew.")
    missing_view_rate: float = Field(0.15, ge=0.0, lt=1.0, description="Chance that a view is missing.")
    seed: int = Field(7, ge=0, description="Seed of the generator: same seed, same folders.")
    mask_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Share of patients whose views come with a "
                                 "lesion mask (manifest column <view>-mask, a PNG; empty for the others), for "
                                 "attention.method = 'mask' or 'cam'. 0: no mask columns.")
    shortcut_sites: str = Field("", description="Comma-separated site numbers (0 = site-0) whose views may carry "
                                "a site-specific shortcut: a bright square marker in a corner, drawn on a view of a "
                                "positive patient with chance shortcut-rate and of a negative one with chance 1 - "
                                "shortcut-rate (a scanner or department that labels its positive studies). Never in "
                                "the held-out test folder. '' = no shortcut.")
    lesion_contrast: float = Field(1.0, ge=0.0, le=4.0, description="Multiplies the brightness of the lesions "
                                   "(the image signal of the label); below 1 they are subtler.")
    shortcut_rate: float = Field(0.9, ge=0.0, le=1.0, description="How strongly the marker follows the label at "
                                 "the shortcut sites (0.5: not at all, 1: always).")

    @field_validator("shortcut_sites")
    @classmethod
    def _site_numbers(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        bad = [p for p in parts if not p.isdigit()]
        if bad:
            raise ValueError(f"site numbers must be whole numbers >= 0 separated by commas (e.g. '0,1'), got {bad}")
        return value

    @property
    def shortcut_site_numbers(self) -> frozenset[int]:
        return frozenset(int(p) for p in self.shortcut_sites.split(",") if p.strip())
