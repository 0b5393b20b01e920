"""`medfusion-fl evaluate MODEL --data FOLDER` and `medfusion-fl explain MODEL --data FOLDER --out DIR`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from medfusion_fl.config_sources import parse_overrides
from medfusion_fl.durable import write_bytes_atomic, write_json_atomic

log = logging.getLogger("medfusion_fl.cli")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medfusion_fl.explain import explanation_figures
    from medfusion_fl.report.build import ReportInputs, write_report
    from medfusion_fl.report.evaluate import load_folder, load_saved, training_overlap
    from medfusion_fl.report.metrics import format_interval  # scikit-learn: 1.5 s no other command needs

    saved = load_saved(Path(args.model), parse_overrides(args.set or []))
    dataset = load_folder(Path(args.data), saved.run)
    overlap = training_overlap(saved.run, dataset)
    if overlap:
        log.warning("%s", overlap)
    probs, labels = saved.probabilities(dataset)
    images: dict[str, bytes] = {}
    notes: list[str] = []
    game = None
    if saved.torch_model is not None:
        from medfusion_fl.explain.pointing import localisation

        images, notes = explanation_figures(saved.torch_model, dataset, saved.run, labels=labels)
        game = localisation(saved.torch_model, dataset, min_side=saved.run.report.cam_min_side,
                            method=saved.run.report.cam_method)
    elif saved.run.report.explain_patients:
        notes.append(f"explanation maps: not drawn from {args.model} (an ONNX file carries no gradients); "
                     "`medfusion-fl explain CHECKPOINT --data FOLDER --out DIR` draws them")
    inputs = ReportInputs(model=saved.label, data=str(args.data), classes=saved.run.data.class_names, labels=labels,
                          probs=probs, temperature=saved.temperature, threshold=saved.threshold, lines=saved.lines,
                          images=images, notes=notes, localisation=game, warnings=[overlap] if overlap else [],
                          initial=saved.initial or None)
    page, numbers = write_report(Path(args.out), inputs, saved.run.report, seed=saved.run.train.seed)
    sys.stdout.write(f"{page}: {len(labels)} patients, AUROC {format_interval(numbers['auroc'])}, "
                     f"AUPRC {format_interval(numbers['auprc'])}, "
                     f"ECE {numbers['calibration']['before']['ece']:.3f} before / "
                     f"{numbers['calibration']['after']['ece']:.3f} after calibration\n")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import numpy as np

    from medfusion_fl.explain.draw import choose_patients, described, explain_patients, figures
    from medfusion_fl.report.evaluate import load_folder, load_saved, require_torch

    saved = load_saved(Path(args.model), parse_overrides(args.set or []))
    model = require_torch(saved)
    dataset = load_folder(Path(args.data), saved.run)
    if len(dataset) == 0:
        from medfusion_fl.errors import DataError

        raise DataError(f"--data {args.data}: no usable patients to explain")
    count = args.patients if args.patients is not None else saved.run.report.explain_patients or 8
    indices = choose_patients(np.array(dataset.labels()), count)
    views, classes = list(saved.run.data.views), list(saved.run.data.class_names)
    explanations, stage = explain_patients(model, dataset, indices, min_side=saved.run.report.cam_min_side,
                                           view_names=views, method=saved.run.report.cam_method)
    out = Path(args.out)
    for name, image in figures(explanations, views, classes, described(stage, saved.run)).items():
        write_bytes_atomic(out / name, image)
    write_json_atomic(out / "explanations.json", {"model": saved.label, "data": str(args.data), "stage": stage,
                                                  "method": f"{saved.run.report.cam_method} (captum), ReLU, bilinear "
                                                            "upsampling",
                                                  "patients": [e.summary() for e in explanations]})
    sys.stdout.write(f"{out}: {stage}, {len(explanations)} patient(s); explanations.json\n")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="the evaluation report of a checkpoint or model.onnx on a labelled folder")
    p.add_argument("model", help="a checkpoint (<run-dir>/checkpoints/round-NNNN.pt) or a model.onnx with its "
                                 "model_card.json beside it")
    p.add_argument("--data", required=True, help="a site folder (manifest.csv + images) with every class")
    p.add_argument("--out", default="evaluation", help="folder for report.html, evaluation.json and the PNGs")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a report.* key, e.g. report.bootstrap=0")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("explain", help="class-activation maps and fusion weights of a checkpoint on a folder")
    p.add_argument("model", help="a checkpoint (<run-dir>/checkpoints/round-NNNN.pt)")
    p.add_argument("--data", required=True, help="a site folder (manifest.csv + images)")
    p.add_argument("--out", required=True, help="folder for explain-N.png and explanations.json")
    p.add_argument("--patients", type=int, help="how many patients (default: report.explain-patients)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a report.* key, e.g. report.cam-min-side=4")
    p.set_defaults(func=cmd_explain)
