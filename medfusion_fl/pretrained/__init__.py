"""The coordinator's initial global model: random, timm's pretrained weights, a local file or an earlier run,
with the norm conversions that keep a BatchNorm backbone valid under per-patient DP, and its provenance."""
