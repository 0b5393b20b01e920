"""MONAI's 3D ResNet and DenseNet as feature extractors, with GroupNorm (per-patient DP and federated
averaging both need norms that see one volume at a time) and reentrant checkpointing per stage.

MONAI is imported here only, when one of these backbones is built (`import monai` takes seconds).
"""

from __future__ import annotations

from torch import nn

from medfusion_fl.models.norms import replace_batchnorm
from medfusion_fl.models.staged3d import Staged3d

# name -> (MONAI builder, its keyword arguments); DenseNets need at least 32 voxels a side (5 halvings)
MONAI3D: dict[str, tuple[str, dict[str, object]]] = {
    "monai-resnet10": ("resnet10", {}),
    "monai-resnet18": ("resnet18", {}),
    "monai-resnet34": ("resnet34", {}),
    "monai-resnet-mini": ("resnet10", {"widen_factor": 0.25}),  # the family's small member: tests, CPU demos
    "monai-densenet121": ("DenseNet121", {}),
    "monai-densenet-mini": ("DenseNet", {"init_features": 16, "growth_rate": 8, "block_config": (2, 2, 2, 2)}),
}
GROUPS = 8
MIN_SIDE = {"monai-densenet121": 32, "monai-densenet-mini": 32}  # 5 halvings: the least voxels a side


def create_monai_3d(name: str, *, in_chans: int) -> nn.Module:
    """One of MONAI3D's backbones (random weights), GroupNorm of GROUPS groups, no classifier."""
    from monai.networks import nets

    builder, extra = MONAI3D[name]
    norm = ("group", {"num_groups": GROUPS})
    if builder.startswith("resnet"):
        net = getattr(nets, builder)(spatial_dims=3, n_input_channels=in_chans, feed_forward=False, norm=norm, **extra)
        replace_batchnorm(net, groups=GROUPS)  # MONAI 1.6's residual blocks build BatchNorm whatever `norm` says
        stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        return Staged3d(stem, stages, nn.Identity(), int(net.in_planes))  # in_planes: layer4's output width
    net = getattr(nets, builder)(spatial_dims=3, in_channels=in_chans, out_channels=1, norm=norm, **extra)
    replace_batchnorm(net, groups=GROUPS)
    children = dict(net.features.named_children())
    stem = nn.Sequential(*(children.pop(key) for key in ("conv0", "norm0", "relu0", "pool0")))
    norm = children.pop("norm5")  # the DenseNet's last norm, then its classifier's ReLU
    return Staged3d(stem, list(children.values()), nn.Sequential(norm, nn.ReLU()), norm.num_channels)
