"""A site's local training on several processes, one per GPU (site.gpus = N): exact per-patient DP-SGD
with the clipped sums all-reduced and the noise drawn once (shard.py), spawned and collected by the
site's agent (launch.py)."""
