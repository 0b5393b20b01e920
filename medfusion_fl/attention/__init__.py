"""Attention supervision: losses that make the model look at the lesion, not at a site's shortcut.

The model's spatial attention is an AttentionGate at one backbone stage (models/attention_gate.py). Three
methods supervise it (attention.method): `mask` pulls it toward a patient's lesion mask, `cam` penalises the
share of it outside the mask, `consistency` makes the maps of a view and of its mirror image agree (no mask
needed). config.py holds the `attention.*` keys, losses.py the losses' definitions, supervise.py the training
step's side: the targets of a batch, the gradient each gate adds, and the loss values.
"""
