"""DP-SGD at a site with Opacus: per-patient clipping, Gaussian noise, Poisson sampling.

One patient is one sample: the model calls its backbone once per view with batch B, so Opacus'
per-sample gradient of a shared layer is the sum over that patient's views, and the clip bounds
the whole patient. prepare_for_dp() applies the fixes shared/notes/opacus.md measured as needed
for timm backbones; families whose layers see windows in the batch dimension are refused.
"""

from __future__ import annotations

import logging
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sized
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from timm.layers.norm import LayerNorm as TimmLayerNorm
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset

from medfusion_fl.attention.config import AttentionConfig
from medfusion_fl.attention.supervise import supervise
from medfusion_fl.config import PrivacyConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.models.dp_form import LayerScale
from medfusion_fl.multigpu.shard import Shard, require_bookkeeping
from medfusion_fl.privacy.accountant import DPStep
from medfusion_fl.privacy.bookkeeping import PerPatientClipper
from medfusion_fl.privacy.conv_sampler import grouped_conv2d_grad_sample
from medfusion_fl.privacy.graphed import PaddedClippedStep
from medfusion_fl.privacy.persample import patient_grads
from medfusion_fl.randomness import derive
from medfusion_fl.train_config import TrainConfig
from medfusion_fl.training import NO_ATTENTION, TrainResult, autocast, make_optimizer

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


Sampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]]


def _exact(sampler: Sampler) -> Sampler:
    """Feed a per-sample-gradient sampler fp32, contiguous tensors.

    Contiguous: Opacus' conv unfold assumes NCHW-contiguous activations; channels-last ones (ConvNeXt's
    downsample convs) give silently wrong per-sample gradients. fp32: under bf16 autocast the captured
    activations and backprops are bf16, and computing per-patient gradients in bf16 loses the digits
    that clipping and summing need."""
    if getattr(sampler, "_medfusion_exact", False):
        return sampler

    def wrapped(layer: nn.Module, activations: list[torch.Tensor],
                backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        def prep(t: torch.Tensor) -> torch.Tensor:
            return t.float().contiguous() if t.is_floating_point() else t.contiguous()

        return sampler(layer, [prep(a) for a in activations], prep(backprops))

    wrapped._medfusion_exact = True  # type: ignore[attr-defined]
    return wrapped


# Opacus looks samplers up by exact type; timm's LayerNorm subclass computes the same as LayerNorm.
GradSampleModule.GRAD_SAMPLERS[TimmLayerNorm] = compute_layer_norm_grad_sample
GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] = grouped_conv2d_grad_sample  # groups > 1 without groups^2 work


def _layer_scale_grad_sample(layer: LayerScale, activations: list[torch.Tensor],
                             backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    return patient_grads(layer, activations[0], backprops, patients=backprops.shape[0])


GradSampleModule.GRAD_SAMPLERS[LayerScale] = _layer_scale_grad_sample
for _type, _sampler in list(GradSampleModule.GRAD_SAMPLERS.items()):
    GradSampleModule.GRAD_SAMPLERS[_type] = _exact(_sampler)
@contextmanager
def per_patient_backward(model: nn.Module) -> Iterator[None]:
    """Run one backward pass so that per-sample gradients sum over every call of a reused module.

    Under reentrant checkpointing Opacus sees a checkpointed module's forward only in the recompute
    during backward, so each view's recompute/backward pair would promote its own per-sample
    gradient and the views of one patient would be stacked as separate batches (or, under Poisson
    sampling, raise Opacus' grad-accumulation error). Parameters whose forward was not counted get
    one pending count: contributions then accumulate, and are promoted once at the end.
    Relies on opacus 1.6 internals (`_forward_counter`); tests/test_dp_sgd.py checks exactness.
    """
    pending = [p for p in model.parameters() if p.requires_grad and getattr(p, "_forward_counter", 0) == 0]
    for p in pending:
        p._forward_counter = 1  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for p in pending:
            p._forward_counter -= 1  # type: ignore[attr-defined]
            if hasattr(p, "_current_grad_sample"):
                promote_current_grad_sample(p)


def train_local_dp(model: nn.Module, dataset: Dataset[Batch], cfg: TrainConfig, privacy: PrivacyConfig, *,
                   device: torch.device, seed: int, proximal_mu: float = 0.0,
                   reference: Mapping[str, torch.Tensor] | None = None, seeded: int | None = None,
                   attention: AttentionConfig = NO_ATTENTION, shard: Shard | None = None) -> tuple[TrainResult, DPStep]:
    """DP-SGD for cfg.local-epochs epochs of Poisson batches; returns what happened and the DP step
    to record in the ledger. FedProx is a post-step pull towards `reference` (the round's global
    weights): a proximal term in the loss would be clipped with the patient's gradient (and Opacus
    overwrites p.grad, silently dropping it).

    privacy.engine picks how per-patient gradients are clipped: 'bookkeeping' (ours, one backward
    pass, privacy/bookkeeping.py) or 'opacus' (Opacus' per-sample hooks). Both clip each patient's
    whole gradient at max-grad-norm, add N(0, (noise-multiplier * max-grad-norm)^2) to the sum and
    divide by the expected batch size: the same DP-SGD step, the same accounting.

    Noise and Poisson sampling draw from generators seeded by the operating system's CSPRNG every
    call: a seed derived from the run config (known to the coordinator) would let anyone regenerate
    the noise, or the batches. `seeded` (medfusion_fl.randomness) seeds both instead: a simulation under
    privacy.secure-rng = false, and tests that compare two runs; a deployed site never sets it.
    `attention`: the run's attention supervision, part of each patient's clipped loss.
    `shard`: this process's share when the site trains on several (medfusion_fl/multigpu): the same
    step over the site's Poisson batch, its patients split across the processes, noise drawn once.
    """
    start = time.perf_counter()
    model.to(device).train()
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(model, cfg)
    if shard is not None:
        require_bookkeeping(privacy.engine, shard.world)
    noise = _secret_generator(device, seeded, "dp-noise")
    pull = {n: t.to(device) for n, t in reference.items()} if (reference is not None and proximal_mu > 0) else {}
    with warnings.catch_warnings():
        # Opacus' hooks fire on module outputs when the first layer's input needs no gradient (always here)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # our generators are seeded from the OS
        if privacy.engine == "bookkeeping":
            sampling = (_secret_generator(torch.device("cpu"), seeded, "poisson") if shard is None else
                        torch.Generator().manual_seed(shard.shared_seed(seeded, "poisson")))
            poisson = DPDataLoader.from_data_loader(loader, generator=sampling)
            expected = max(1, int(len(cast(Sized, dataset)) * poisson.sample_rate))  # as Opacus' mean reduction
            step = BookkeepingStep(model, privacy, noise, expected=expected, attention=attention, shard=shard,
                                   class_weights=cfg.weights)
            try:
                batches = poisson if shard is None else shard.batches(poisson)
                loss_mean, seen, steps = _run_epochs(model, batches, optimizer, cfg, device, pull, proximal_mu, step)
            finally:
                step.clipper.detach()
            if shard is not None:  # the site's last-epoch loss and patients, over every process
                loss_sum, count = shard.totals(loss_mean * seen, seen)
                loss_mean, seen = loss_sum / max(count, 1), int(count)
            sample_rate = float(poisson.sample_rate)
        else:
            if cfg.weights:
                raise ConfigError("train.class-weights needs privacy.engine = 'bookkeeping' (Opacus' optimizer "
                                  "clips inside its step, where a weight after clipping cannot be applied)")
            loss_mean, seen, steps, sample_rate = _opacus_epochs(model, loader, optimizer, cfg, privacy, device,
                                                                 pull, proximal_mu, noise, attention,
                                                                 _secret_generator(torch.device("cpu"), seeded,
                                                                                   "poisson"))
    result = TrainResult(loss_mean, seen, steps, time.perf_counter() - start)
    return result, DPStep(privacy.noise_multiplier, sample_rate, steps)


class BookkeepingStep:
    """One DP-SGD step's gradients with privacy/bookkeeping.py: forward, one clipped backward, noise.
    Sets p.grad = (sum_i clip(grad_i) + N(0, (sigma C)^2)) / expected for every trainable parameter;
    the caller runs the optimizer (train_local_dp, bench/dp_overhead.py).
    `noise`: a generator the coordinator cannot know (train_local_dp seeds it from the OS).
    `shard`: one of several processes (multigpu/shard.py): rank 0 alone adds the noise, then the
    processes' sums are summed, before the division by the site's expected batch size."""

    def __init__(self, model: nn.Module, privacy: PrivacyConfig, noise: torch.Generator, *, expected: int,
                 attention: AttentionConfig = NO_ATTENTION, shard: Shard | None = None,
                 class_weights: tuple[float, ...] = ()) -> None:
        self.model, self.expected, self.noise, self.privacy = model, expected, noise, privacy
        self.attention, self.shard = attention, shard
        self.std = privacy.noise_multiplier * privacy.max_grad_norm
        self.clipper = PerPatientClipper(model, max_grad_norm=privacy.max_grad_norm)
        self._draw: torch.Tensor | None = None  # the step's noise, one draw for all parameters
        self._graphed: PaddedClippedStep | None = None  # privacy.cuda-graphs
        # train.class-weights: each class's factor on its patients' clipped gradients (each in (0, 1])
        if class_weights and privacy.cuda_graphs:  # the captured step clips without weights: refuse, not ignore
            raise ConfigError("train.class-weights is applied by the eager step only: set privacy.cuda-graphs = false")
        self.class_weights = torch.tensor(class_weights) if class_weights else None

    def __call__(self, batch: Batch, device: torch.device, precision: str) -> tuple[float, int]:
        n = len(batch["label"])
        if n and self.privacy.cuda_graphs:
            with record_function("dp.graphed"):
                losses = self._graphs(device, precision)(batch)
        elif n:  # the engine clips the sum of per-patient losses: each patient's attention loss weighs 1
            with supervise(self.model, batch, self.attention, scale=1.0):
                with self.clipper.forward(n), record_function("dp.forward"):
                    # no autocast cast cache: the weights need no gradient during the step (nothing to
                    # cache), and a reentrant checkpoint's input, a leaf, would get one cached bf16 cast
                    # whose consumers' gradients then add up in bf16 instead of fp32 (~1% off in early
                    # layers' weight gradients on CUDA, where GroupNorm runs in fp32)
                    losses = _patient_losses(self.model, batch, device, precision, cast_cache=False)
                with record_function("dp.backward"):
                    weights = (None if self.class_weights is None else
                               self.class_weights.to(losses.device)[batch["label"].to(losses.device)])
                    self.clipper.clip_backward(losses, weights)
        with record_function("dp.noise"):  # one draw for all parameters: a kernel, not one per parameter
            params = self.clipper.params
            grads = [p.grad if (n and p.grad is not None) else torch.zeros_like(p) for p in params]
            if self.shard is None or self.shard.adds_noise:
                if self._draw is None:  # kept across steps: a fresh 4-bytes-per-weight buffer costs page faults
                    self._draw = torch.empty(sum(p.numel() for p in params), device=params[0].device)
                noise = torch.split(self._draw.normal_(0.0, self.std, generator=self.noise),
                                    [p.numel() for p in params])
                torch._foreach_add_(grads, [z.view_as(p) for z, p in zip(noise, params, strict=True)])
            if self.shard is not None:
                self.shard.sum_(grads)
            torch._foreach_div_(grads, float(self.expected))
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
        return (float(losses.detach().mean()) if n else 0.0), n

    def _graphs(self, device: torch.device, precision: str) -> PaddedClippedStep:
        if device.type != "cuda":
            raise ConfigError(f"privacy.cuda-graphs = true, but this site trains on {device.type!r}: CUDA graphs "
                              "need a CUDA GPU. Set privacy.cuda-graphs = false in the run config.")
        if self._graphed is None:
            def losses(batch: Batch) -> torch.Tensor:  # the eager step's forward, on the padded buffers
                return _patient_losses(self.model, batch, device, precision, cast_cache=False)

            self._graphed = PaddedClippedStep(self.clipper, losses, device=device,
                                              multiple=self.privacy.graph_batch_multiple, graphs=True)
        return self._graphed


def _opacus_epochs(model: nn.Module, loader: DataLoader[Batch], optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   privacy: PrivacyConfig, device: torch.device, pull: Mapping[str, torch.Tensor],
                   proximal_mu: float, noise: torch.Generator, attention: AttentionConfig,
                   sampling: torch.Generator) -> tuple[float, int, int, float]:
    """The same DP-SGD with Opacus' hooks (patients along dimension 0 of every layer call)."""
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    set_view_folding(model, False)
    hooks, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
        wrap_model=False, noise_generator=noise)
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, UniformWithReplacementSampler):
        raise RuntimeError(f"opacus returned {type(sampler).__name__}, not a Poisson sampler; pin opacus 1.6.*")
    sampler.generator = sampling  # which patients a step saw stays secret

    def step(batch: Batch, device: torch.device, precision: str) -> tuple[float, int]:
        n = len(batch["label"])
        with supervise(model, batch, attention, scale=1.0 / max(n, 1)):  # the mean loss weighs each patient 1/n
            losses = _patient_losses(model, batch, device, precision)
            if len(losses):
                with per_patient_backward(model):
                    losses.mean().backward()  # type: ignore[no-untyped-call]
        return (float(losses.detach().mean()) if len(losses) else 0.0), len(losses)

    try:
        loss_mean, seen, steps = _run_epochs(model, loader, optimizer, cfg, device, pull, proximal_mu, step)
    finally:
        hooks.cleanup()  # the model can be evaluated, exported or privatised again next round
        set_view_folding(model, True)
    return loss_mean, seen, steps, float(getattr(loader, "sample_rate", 1.0 / len(loader)))


def set_view_folding(model: nn.Module, enabled: bool) -> None:
    """Fold a shared backbone's views into the batch (bookkeeping, plain training) or call it once per
    view with batch B (Opacus' hooks, which treat every row of a layer call as one sample)."""
    for module in model.modules():
        if hasattr(module, "fold_views"):
            setattr(module, "fold_views", enabled)  # noqa: B010


def _patient_losses(model: nn.Module, batch: Batch, device: torch.device, precision: str, *,
                    cast_cache: bool = True) -> torch.Tensor:
    """Each patient's cross-entropy, (B,); empty for an empty Poisson batch."""
    views, mask = batch["views"].to(device), batch["view_mask"].to(device)
    tabular, labels = batch["tabular"].to(device), batch["label"].to(device)
    if len(labels) == 0:
        return torch.zeros(0, device=device)
    with autocast(precision, device, cache=cast_cache):  # bf16 or fp32: fp16 is refused under DP by the config
        logits = model(views, mask, tabular)
    return F.cross_entropy(logits.float(), labels, reduction="none")


StepFn = Callable[[Batch, torch.device, str], tuple[float, int]]


def _run_epochs(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                device: torch.device, pull: Mapping[str, torch.Tensor], proximal_mu: float,
                step: StepFn) -> tuple[float, int, int]:
    """The DP-SGD loop; returns the last epoch's mean loss, its patients and the steps taken."""
    named = dict(model.named_parameters())
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(cfg.local_epochs):
        loss_sum, seen = 0.0, 0
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss, n = step(batch, device, cfg.precision)
            optimizer.step()
            if pull:
                with torch.no_grad():
                    for name, target in pull.items():
                        named[name].sub_(cfg.lr * proximal_mu * (named[name] - target))
            loss_sum += loss * n
            seen += n
            steps += 1
    return loss_sum / max(seen, 1), seen, steps


def _secret_generator(device: torch.device, seeded: int | None, purpose: str) -> torch.Generator:
    """A generator seeded with 63 bits from the OS CSPRNG (Opacus' secure_mode needs torchcsprng,
    which has no build for our torch), or from `seeded` and the purpose (medfusion_fl.randomness).
    Poisson sampling also draws from one: with torch's global RNG, seeded by build_model from the run
    config, the coordinator could tell which patients each step used, which voids the subsampling
    amplification in the accountant."""
    seed = secrets.randbits(63) if seeded is None else derive(seeded, purpose)
    return torch.Generator(device=device).manual_seed(seed)
