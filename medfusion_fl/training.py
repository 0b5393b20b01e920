"""Local training and evaluation of the MedFusion model on one site's data (no flwr here)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfusion_fl.attention.config import AttentionConfig
from medfusion_fl.attention.supervise import supervise
from medfusion_fl.errors import ConfigError
from medfusion_fl.train_config import TrainConfig

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    from medfusion_fl.multigpu.shard import Shard

Batch = dict[str, torch.Tensor]
NO_ATTENTION = AttentionConfig()


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the last epoch (without the proximal term)
    num_examples: int  # patients seen per epoch
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    auroc: float | None  # None when only one class is present
    num_examples: int


def resolve_device(name: str) -> torch.device:
    """'auto' = CUDA when available; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no CUDA GPU; set device = 'cpu' or 'auto'.")
    return torch.device(name)


def autocast(precision: str, device: torch.device, *, cache: bool = True) -> torch.autocast:
    """The autocast context of train.precision (disabled for fp32); fp16 needs CUDA. `cache`: autocast's
    cache of half casts of leaf tensors that need gradients (weights, and a reentrant checkpoint's input)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision = 'fp16' needs a CUDA device; use 'bf16' on CPU.")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32", cache_enabled=cache)


def _forward(model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    views = batch["views"].to(device)  # (B, V, C, H, W)
    mask = batch["view_mask"].to(device)  # (B, V)
    tabular = batch["tabular"].to(device)  # (B, F)
    return model(views, mask, tabular), batch["label"].to(device)  # (B, K), (B,)


def proximal_term(model: nn.Module, reference: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: (mu / 2) * sum over trainable parameters of ||w - w_global||^2."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, param in model.named_parameters():
        if param.requires_grad:
            total = total + (param - reference[name]).pow(2).sum()
    return 0.5 * mu * total


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimiser of train.optimizer over the trainable parameters (fresh each round)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(model: nn.Module, dataset: Dataset[Batch], cfg: TrainConfig, *, device: torch.device, seed: int,
                proximal_mu: float = 0.0, attention: AttentionConfig | None = None,
                shard: Shard | None = None) -> TrainResult:
    """Train `cfg.local_epochs` epochs; with proximal_mu > 0 the FedProx term pulls towards the
    weights the model had on entry (the global model of the round). `attention`: the run's attention
    supervision, whose loss joins each patient's (the batches then carry masks where the method needs them).
    `shard`: this process's share when the site trains on several (medfusion_fl/multigpu): its patients
    of each batch; the gradients of the batch's mean loss are summed over the processes."""
    start = time.perf_counter()
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    loader = (DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator) if shard is None
              else shard.shuffled(dataset, cfg.batch_size, generator))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()} if proximal_mu > 0 else {}
    pull = proximal_mu > 0 and (shard is None or shard.rank == 0)  # the FedProx term's gradient counts once
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg)
    class_weights = torch.tensor(cfg.weights, device=device) if cfg.weights else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    steps, epoch_loss, seen = 0, 0.0, 0
    for epoch in range(cfg.local_epochs):
        epoch_loss, attention_sum, seen = 0.0, 0.0, 0
        for batch in loader:
            n = len(batch["label"])
            total_n = n if shard is None else int(shard.totals(n)[0])  # the whole batch's patients
            # the mean loss weighs each patient 1/B; the fp16 scaler multiplies every gradient, the gates' too
            scale = (scaler.get_scale() if scaler.is_enabled() else 1.0) / total_n
            optimizer.zero_grad(set_to_none=True)
            if n:
                with supervise(model, batch, attention or NO_ATTENTION, scale=scale) as step:
                    with autocast(cfg.precision, device):
                        logits, labels = _forward(model, batch, device)
                    # the loss in fp32, whatever the autocast
                    per_patient = F.cross_entropy(logits.float(), labels, reduction="none")
                    if class_weights is not None:  # train.class-weights: as under DP, each patient's by its class
                        per_patient = per_patient * class_weights[labels]
                    loss = per_patient.sum() / total_n
                    total = loss + proximal_term(model, reference, proximal_mu) if pull else loss
                    scaler.scale(total).backward()  # type: ignore[no-untyped-call]
                if step is not None:
                    attention_sum += float(step.patient_losses().sum())
                epoch_loss += float(loss.detach()) * total_n
            elif pull:
                scaler.scale(proximal_term(model, reference, proximal_mu)).backward()  # type: ignore[no-untyped-call]
            if shard is not None:
                shard.sum_grads(params)
            scaler.step(optimizer)
            scaler.update()
            seen += n
            steps += 1
        log.debug("epoch %d/%d: loss %.4f%s", epoch + 1, cfg.local_epochs, epoch_loss / max(seen, 1),
                  f", attention loss {attention_sum / max(seen, 1):.4f}" if attention is not None and
                  attention.enabled else "")
    if shard is not None:  # the site's last-epoch loss and patients, over every process
        epoch_loss, count = shard.totals(epoch_loss, seen)
        seen = int(count)
    mean = epoch_loss / max(seen, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(f"local training diverged (loss {mean}); lower train.lr")
    return TrainResult(mean, seen, steps, time.perf_counter() - start)


def auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary AUROC, or one-vs-rest macro AUROC for K > 2; None if a class is absent."""
    from sklearn.metrics import roc_auc_score  # here: a site that trains and releases histograms never needs it

    num_classes = probs.shape[1]
    if len(np.unique(labels)) < num_classes:
        return None
    if num_classes == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset[Batch], *, batch_size: int,
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) and labels (N,) over a dataset."""
    model.to(device).eval()
    probs, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits, y = _forward(model, batch, device)
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
    return np.concatenate(probs), np.concatenate(labels)


def score(probs: np.ndarray, labels: np.ndarray) -> EvalResult:
    """Cross-entropy, accuracy and AUROC of class probabilities (N, K) against labels (N,)."""
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return EvalResult(loss=float(-np.log(picked).mean()), accuracy=float((probs.argmax(axis=1) == labels).mean()),
                      auroc=auroc(labels, probs), num_examples=len(labels))


def at_threshold(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Binary tasks: accuracy, sensitivity and specificity when class 1 is predicted at score >= threshold."""
    predicted = probs[:, 1] >= threshold
    positive = labels == 1
    tp, tn = int((predicted & positive).sum()), int((~predicted & ~positive).sum())
    return {"threshold": threshold, "accuracy-at-threshold": (tp + tn) / max(len(labels), 1),
            "sensitivity": tp / max(int(positive.sum()), 1), "specificity": tn / max(int((~positive).sum()), 1)}


def evaluate(model: nn.Module, dataset: Dataset[Batch], *, batch_size: int,
             device: torch.device) -> EvalResult:
    """Cross-entropy, accuracy and AUROC of the model on a dataset."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot evaluate on an empty dataset")
    probs, labels = predict(model, dataset, batch_size=batch_size, device=device)
    return score(probs, labels)
