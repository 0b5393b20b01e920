"""Real-data benchmark: scikit-learn's breast cancer data (569 real patients, 30 features =
10 measurements x mean / standard error / worst) over 4 simulated hospitals.

Per seed: a stratified 25% held-out test set; the other patients go to 4 hospitals with Dirichlet
(alpha 0.5) label skew. Each hospital is a real site folder (manifest.csv, the model's tabular path:
30 clinical columns scaled by the ranges the data set publishes, some on a log scale; no image views) read
by our data pipeline. Methods: pooled (one site holding everyone), each single site, FedAvg and FedProx
(mu 0.1), each without and with DP-SGD (noise 1.5, clip 1.0, per-patient, epsilon at delta 1e-5 reported as the
largest site's). Federated rounds call the same local training and strategy code as the round loop,
in process (no Flower transport). Prints JSON with test accuracy and AUROC, mean and std over seeds.

  python bench/real_tabular.py --seeds 5 --out bench/results/results-real-tabular.json
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from stepbench import write_report  # noqa: E402

from medfusion_fl.config import RunConfig  # noqa: E402
from medfusion_fl.console import ensure_logging  # noqa: E402
from medfusion_fl.data import load_site, load_test_set  # noqa: E402
from medfusion_fl.models import build_model  # noqa: E402
from medfusion_fl.parameters import get_weights, set_weights  # noqa: E402
from medfusion_fl.training import evaluate, train_local  # noqa: E402
from strategies import Update, build_strategy  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.real_tabular")
SITES, ALPHA, ROUNDS, DELTA = 4, 0.5, 15, 1e-5


def _columns() -> list[str]:
    """Each measurement's range as the data set publishes it (the minimum and maximum in its description, rounded to
    3 decimals there), widened 20% below and 5% above for that rounding: what a consortium writes from published
    values, no patient's. A strictly positive measurement spanning 8x or more (areas, standard errors) is given on a
    log scale, as skewed lab values are, so that typical patients sit near the middle of [-1, 1]. The first version
    of this benchmark (until 2026-12-08) used 0 to 1.5x the largest value: most patients then sat near -1 on every
    column, and DP training drifted to the majority class (docs/benchmarks.md, *Real patients*)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [n.replace(" ", "-") for n in data.feature_names]
    published = re.findall(r"^(.+?) \((?:mean|standard error|worst)\):\s+([0-9.]+)\s+([0-9.]+)\s*$", data.DESCR,
                           re.MULTILINE)
    if len(published) != len(names):
        raise RuntimeError(f"scikit-learn's breast cancer description lists {len(published)} ranges, not 30")
    columns = []
    for name, (_, low, high) in zip(names, published, strict=True):
        lo, hi = float(low) * 0.8, float(high) * 1.05
        columns.append(f"{name}:{lo:.6g}:{hi:.6g}" + (":log" if lo > 0 and hi / lo >= 8 else ""))
    return columns


def _write(folder: Path, x: np.ndarray, y: np.ndarray, columns: list[str]) -> None:
    folder.mkdir(parents=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "label", *(c.split(":")[0] for c in columns)])
        for i, (row, label) in enumerate(zip(x, y, strict=True)):
            writer.writerow([f"{folder.name}-{i:04d}", ["malignant", "benign"][label], *(f"{v:.6g}" for v in row)])


def _split(seed: int, root: Path) -> tuple[RunConfig, list[Path], Path]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    columns = _columns()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    owner = np.empty(len(y_train), int)
    for label in (0, 1):  # Dirichlet label skew: each class spread over the sites with its own proportions
        idx = rng.permutation(np.flatnonzero(y_train == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(SITES, ALPHA))) * len(idx)).astype(int)[:-1]
        for site, part in enumerate(np.split(idx, cuts)):
            owner[part] = site
    folders = []
    for site in range(SITES):
        folders.append(root / f"site-{site}")
        _write(folders[-1], x_train[owner == site], y_train[owner == site], columns)
    _write(root / "test", x_test, y_test, columns)
    _write(root / "pooled", x_train, y_train, columns)
    run = RunConfig.from_flat({
        "data.source": "folders", "data.view-names": "", "data.classes": "malignant,benign",
        "data.val-fraction": 0.0, "data.tabular-columns": ",".join(columns),
        "model.tabular-hidden": 32, "model.dropout": 0.0, "train.batch-size": 16, "train.lr": 0.01,
        "train.local-epochs": 1, "privacy.noise-multiplier": 1.5, "privacy.max-grad-norm": 1.0})
    return run, folders, root / "test"


def _train(run: RunConfig, model: torch.nn.Module, dataset: Any, *, dp: bool, seed: int,
           mu: float = 0.0) -> tuple[int, Any]:
    if not dp:
        result = train_local(model, dataset, run.train, device=torch.device("cpu"), seed=seed, proximal_mu=mu)
        return result.num_examples, None
    from medfusion_fl.privacy.dp_sgd import train_local_dp

    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    result, step = train_local_dp(model, dataset, run.train, run.privacy, device=torch.device("cpu"), seed=seed,
                                  proximal_mu=mu, reference=reference)
    return len(dataset), step


def _run_method(run: RunConfig, folders: list[Path], test: Any, *, method: str, dp: bool,
                seed: int) -> dict[str, float]:
    from medfusion_fl.privacy.accountant import epsilon

    cfg = run.model_copy(update={"privacy": run.privacy.model_copy(update={"enabled": dp})})
    sites = [load_site(f, cfg.data).train for f in folders]
    model = build_model(cfg, seed=seed)
    histories: list[list[Any]] = [[] for _ in sites]
    if method in ("fedavg", "fedprox"):
        mu = 0.1 if method == "fedprox" else 0.0
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Flower's messages need a run
        flat = {**cfg.to_flat(), "strategy.name": method, "strategy.proximal-mu": mu if method == "fedprox" else ""}
        strategy = build_strategy(RunConfig.from_flat(flat))
        weights = get_weights(model)
        for rnd in range(ROUNDS):
            updates = []
            for k, data in enumerate(sites):
                local = build_model(cfg, seed=seed)
                set_weights(local, weights)
                n, step = _train(cfg, local, data, dp=dp, seed=seed * 1000 + rnd * 10 + k, mu=mu)
                updates.append(Update(get_weights(local), n))
                if step is not None:
                    histories[k].append(step)
            strategy.train_config(rnd + 1, weights, {"server-round": rnd + 1})
            weights = strategy.aggregate_updates(rnd + 1, weights, updates)
        set_weights(model, weights)
    else:  # pooled or one site alone: the same number of local epochs as the federation's rounds
        for epoch in range(ROUNDS):
            _, step = _train(cfg, model, sites[0], dp=dp, seed=seed * 1000 + epoch)
            if step is not None:
                histories[0].append(step)
    result = evaluate(model, test, batch_size=256, device=torch.device("cpu"))
    eps = max((epsilon(h, delta=DELTA) for h in histories if h), default=0.0)
    return {"accuracy": result.accuracy, "auroc": float(result.auroc or float("nan")), "epsilon": eps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ensure_logging()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            run, folders, test_folder = _split(seed, Path(tmp))
            test = load_test_set(test_folder, run.data)
            plans = [("pooled", [Path(tmp) / "pooled"]), *[(f"site-{k}", [f]) for k, f in enumerate(folders)],
                     ("fedavg", folders), ("fedprox", folders)]
            for name, where in plans:
                for dp in (False, True):
                    method = name if name in ("fedavg", "fedprox") else "local"
                    key = f"{name}{' +DP' if dp else ''}"
                    results.setdefault(key, []).append(_run_method(run, where, test, method=method, dp=dp, seed=seed))
            log.info("seed %d done: %s", seed, {k: round(v[-1]["auroc"], 3) for k, v in results.items()})
    table = {key: {f"{metric}_{stat}": round(float(fn([r[metric] for r in rows])), 4)
                   for metric in ("accuracy", "auroc", "epsilon") for stat, fn in (("mean", np.nanmean),
                                                                                   ("std", np.nanstd))}
             for key, rows in results.items()}
    report = {"data": "sklearn breast cancer (569 patients, 30 features)", "sites": SITES, "dirichlet_alpha": ALPHA,
              "rounds_or_epochs": ROUNDS, "seeds": args.seeds, "delta": DELTA, "results": table}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
