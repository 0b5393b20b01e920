"""The 3D backbones beyond our own ResNet: Swin 3D's DP form computes torchvision's Swin 3D, MONAI's
networks carry no BatchNorm, and misuse gets errors that say what to change. Exactness of per-patient DP
for every 3D family: tests/test_bookkeeping.py and tests/test_dp_sgd.py (their family lists hold them)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.video.swin_transformer import PatchEmbed3d, SwinTransformer3d

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError, ModelError
from medfusion_fl.models import build_model
from medfusion_fl.models.backbone3d import create_backbone_3d
from medfusion_fl.models.monai3d import MONAI3D
from medfusion_fl.models.staged3d import Staged3d
from medfusion_fl.models.swin3d import PATCH, SWIN3D, RelativePositionBias, create_swin3d


def _torchvision_twin(ours: Staged3d, name: str) -> SwinTransformer3d:
    """torchvision's SwinTransformer3d of the same size, holding our weights (the bias table renamed back)."""
    embed, depths, heads, window = SWIN3D[name]
    ref = SwinTransformer3d(patch_size=list(PATCH), embed_dim=embed, depths=list(depths), num_heads=list(heads),
                            window_size=list(window), stochastic_depth_prob=0.0, num_classes=1,
                            patch_embed=partial(PatchEmbed3d, in_channels=1))
    renamed = {"stem.": "patch_embed.", "stages.": "features.", "final.": "norm.",
               "relative_position_bias.table": "relative_position_bias_table"}
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in renamed.items():
            key = key.replace(old, new)
        state[key] = value
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("relative_position_index") or k.startswith("head.") for k in result.missing_keys)
    return ref.eval()


@pytest.mark.parametrize("shape", [(16, 32, 32), (10, 20, 28)], ids=["shifted-windows", "padded-windows"])
def test_swin3d_computes_torchvisions_swin3d(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    ours = create_swin3d("swin3d-micro", 1).eval()
    ref = _torchvision_twin(ours, "swin3d-micro")
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        want = ref.norm(ref.features(ref.patch_embed(x))).mean(dim=(1, 2, 3))
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)
    biases = [m for m in ours.modules() if isinstance(m, RelativePositionBias)]
    assert len(biases) == sum(SWIN3D["swin3d-micro"][1])  # every block's table is in its module


def test_swin3d_keeps_each_patients_windows_together() -> None:
    """Patient b's windows are rows b*nW..: changing one patient's volume changes only its rows of the bias input."""
    torch.manual_seed(0)
    model = create_swin3d("swin3d-micro", 1).eval()
    seen: list[torch.Tensor] = []
    bias = next(m for m in model.modules() if isinstance(m, RelativePositionBias))
    bias.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach().clone()))
    x = torch.randn(3, 1, 16, 32, 32)
    with torch.no_grad():
        model(x)
        x[1] += 1.0
        model(x)
    before, after = (t.reshape(3, -1) for t in seen)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])


@pytest.mark.parametrize("name", list(MONAI3D))
def test_monai_backbones_carry_group_norms_only(name: str) -> None:
    model = create_backbone_3d(name, in_chans=2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 2, 32, 32, 32)).shape == (1, model.num_features)


def test_misuse_is_named() -> None:
    with pytest.raises(ConfigError, match="swin3d-micro.*3D backbone; set data.depth > 0"):
        build_model(RunConfig.from_flat({"model.backbone": "swin3d-micro"}))
    with pytest.raises(ConfigError, match=r"at least 32 voxels a side.*8 x 16 x 16.*data.depth=32"):  # 5 halvings
        build_model(RunConfig.from_flat({"model.backbone": "monai-densenet-mini", "data.depth": 8,
                                         "data.image-size": 16}))
    with pytest.raises(ModelError, match="not a 3D backbone.*swin3d-t"):
        build_model(RunConfig.from_flat({"model.backbone": "swin3d-tiny", "data.depth": 8}))
    opacus = {"model.backbone": "swin3d-micro", "data.depth": 8, "data.image-size": 16, "privacy.engine": "opacus"}
    with pytest.raises(ConfigError, match="privacy.engine = 'bookkeeping'"):
        build_model(RunConfig.from_flat(opacus))
    build_model(RunConfig.from_flat({**opacus, "privacy.engine": "bookkeeping"}))  # the engine that serves it
