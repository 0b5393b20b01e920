"""[evaluation]: what a site releases about its validation patients, when, and how the coordinator reads it
(medfusion_fl.config gathers the sections)."""

from __future__ import annotations

from pydantic import Field, field_validator

from medfusion_fl.config_base import Section


class EvaluationConfig(Section):
    """What a site releases about its validation patients: one vector of sums per scheduled round (score
    histograms per true class and the clipped loss sum), summed securely, with DP noise under privacy.enabled."""

    noise_multiplier: float = Field(
        2.0, ge=0.0, description="Gaussian noise std / sensitivity (sqrt 2: one histogram count and one clipped "
        "loss per patient) added by each site to its release under privacy.enabled. One evaluation costs "
        "epsilon ~2.2 alone at delta 1e-5 and is charged to the site's ledger; 3 rounds with DP-SGD at noise 1.0 "
        "and ~100 training patients reach ~7.5 instead of ~6.2.")
    bins: int = Field(10, ge=2, le=200, description="Score bins of the released histograms (binary tasks): the "
                      "operating threshold is chosen among 1/bins, 2/bins, ...; fewer bins, less noise per "
                      "threshold under DP (10 bins kept the demo's accuracy at the threshold within 0.03 of "
                      "noiseless 50-bin histograms in a 24-patients-per-site simulation).")
    calibrate: bool = Field(True, description="Binary tasks: fit a temperature to the last release's pooled score "
                            "histograms (post-processing of the release: no extra privacy cost); model.onnx divides "
                            "its logits by it and the model card states it. false: temperature 1.")
    every: int = Field(1, description="Sites release an evaluation at rounds every, 2 x every, ... and always at "
                       "the last round: 1 = every round (the coordinator follows the pooled figures round by "
                       "round); a value >= rounds.num-server-rounds = the last round only, so a site's budget pays "
                       "for one release instead of one a round (each costs epsilon ~2.2 at the default noise). "
                       "Rounds without a release keep the last released threshold.")
    target_sensitivity: float = Field(
        0.0, description="0 = the operating threshold maximises sensitivity + specificity (Youden; under DP the "
        "one-standard-error rule). A value in (0, 1), e.g. 0.9 for a screening test: the highest bin edge whose "
        "pooled sensitivity reaches it (under DP: its sensitivity less one standard error of the noise); the "
        "lowest edge when none does, and the card says the target was not shown to be met.")

    budget_share: float = Field(
        0.0, description="0 = every site adds evaluation.noise-multiplier's noise. A share s in (0, 1): each site "
        "splits its own budget (its policy's max-epsilon and delta) itself: its evaluation noise is the smallest "
        "(to 0.01, at least its min-noise-multiplier) at which the releases evaluation.every schedules over the "
        "run cost s x max-epsilon alone, and it keeps that much for them: it declines a training round that "
        "would leave too little for the releases still to come. Fewer releases (evaluation.every), less noise "
        "each: 0.25 of the default 8 with one release at the end gives noise 2.15 per site, 0.3 with one a "
        "round of 3 gives 3.16.")

    @field_validator("bins")
    @classmethod
    def _even_bins(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"bins = {value} must be even, so that 0.5 is a bin edge (accuracy at 0.5 is read "
                             "from the histograms)")
        return value

    @field_validator("every")
    @classmethod
    def _releases(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"every = {value} would never release an evaluation: no pooled figures, threshold or "
                             "calibration. Use 1 for every round, or rounds.num-server-rounds for the last round "
                             "only (rounds.fraction-evaluate = 0 turns federated evaluation off)")
        return value

    @field_validator("target_sensitivity")
    @classmethod
    def _a_rate(cls, value: float) -> float:
        if value != 0.0 and not 0.0 < value < 1.0:
            raise ValueError(f"target-sensitivity = {value} is not a sensitivity in (0, 1): give e.g. 0.9 to place "
                             "the threshold where the pooled sensitivity reaches 90%, or 0 for Youden's threshold")
        return value

    @field_validator("budget_share")
    @classmethod
    def _a_share(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            what = "leaves training nothing" if value >= 1.0 else "is not a share"
            raise ValueError(f"budget-share = {value} {what}: give the share of each site's budget its evaluation "
                             "releases may spend, in (0, 1) (e.g. 0.15), or 0 to use evaluation.noise-multiplier")
        return value

    def releases_at(self, server_round: int, last_round: int) -> bool:
        """Whether sites release an evaluation after `server_round` of a run of `last_round` rounds."""
        return server_round % self.every == 0 or server_round >= last_round

    def releases_from(self, server_round: int, last_round: int) -> int:
        """How many releases the schedule asks for at rounds server_round .. last_round."""
        return sum(self.releases_at(r, last_round) for r in range(server_round, last_round + 1))
