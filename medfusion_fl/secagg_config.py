"""The `secagg.*` keys: secure aggregation (SecAgg+) of every site's update and evaluation release."""

from __future__ import annotations

from pydantic import Field, model_validator

from medfusion_fl.config_base import Section


class SecAggConfig(Section):
    enabled: bool = Field(True, description="Secure aggregation (SecAgg+): the coordinator learns only sums over "
                          "sites (updates, counts, evaluation releases), never one site's (on by default; false is "
                          "warned and stated in the model card).")
    threshold: int = Field(2, ge=2, description="t: sites whose shares rebuild a secret; a round needs t sites "
                           "to the end. Higher t resists more colluding sites, tolerates fewer drop-outs.")
    neighbours: int = Field(8, ge=0, description="k: each site masks with k neighbours (even; SecAgg+ graph, "
                            "cost grows with k, not n): every other site while n - 1 <= k, above that a k-regular "
                            "ring (docs/design.md: why 8); 0 = always every other site (SecAgg).")
    clip: float = Field(1.0, gt=0.0, description="Bound on each |delta| entry (local minus global weight) before "
                        "quantisation; entries beyond it are clipped AND counted in the round's metrics.")
    bits: int = Field(16, ge=4, le=32, description="Quantisation levels 2^bits per entry over [-clip, clip]; "
                      "the sum is exact modulo 2^32 (or 2^64 when n x max-weight x 2^bits needs it).")
    max_weight: int = Field(4096, ge=1, description="Largest example count (FedAvg weight) a site may send; a "
                            "site with more patients refuses the round with a message to raise it.")
    update_norm_bound: float = Field(100.0, gt=0.0, description="Bound on the L2 norm of each site's update (local "
                                     "minus global weights), applied at the site before masking: one site, however "
                                     "wrong its data, moves the mean by at most its weight share of this bound. "
                                     "Stated in the model card.")

    @model_validator(mode="after")
    def _even_degree(self) -> SecAggConfig:
        if self.neighbours % 2:
            raise ValueError(f"neighbours = {self.neighbours} must be even (k/2 on each side of a ring) or 0 "
                             "(complete graph)")
        if self.neighbours and self.threshold > self.neighbours + 1:
            raise ValueError(f"threshold = {self.threshold} > neighbours + 1 = {self.neighbours + 1}: a site's "
                             "secrets are shared among itself and the sites next to it only; lower threshold")
        return self
