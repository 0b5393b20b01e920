"""The `medfusion-fl` command: synth, site check/status/audit/run/import/review/approve, certs, simulate, export,
evaluate, explain, console, config show."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfusion_fl import presets
from medfusion_fl.approval.cli import add_commands as add_approval_commands
from medfusion_fl.config import RunConfig, all_keys, privacy_warnings
from medfusion_fl.config_sources import flatten, parse_overrides, read_toml_flat
from medfusion_fl.console import ensure_logging
from medfusion_fl.errors import ConfigError, MedFusionError, RunStopped, SimulationFailed
from medfusion_fl.pretrained.cli import add_commands as add_pretrain_commands
from medfusion_fl.pretrained.cli import public_start
from medfusion_fl.report.cli import add_commands as add_report_commands
from medfusion_fl.webconsole.cli import add_commands as add_console_commands

log = logging.getLogger("medfusion_fl.cli")
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences Ray's FutureWarning on CPU-only runs
}


def _run_config(args: argparse.Namespace, under: dict[str, Any] | None = None,
                over: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then `under` (a preset), --config, `over` (what the command itself decides) and --set."""
    config = read_toml_flat(args.config) if args.config else {}
    return RunConfig.from_flat({**(under or {}), **config, **(over or {}), **parse_overrides(args.set or [])})


def cmd_synth(args: argparse.Namespace) -> int:
    from medfusion_fl.data import write_federation

    run = _run_config(args)
    if args.public is not None:
        from medfusion_fl.data.synthetic import write_public

        if args.public < 10:
            raise ConfigError(f"--public {args.public}: a pretraining folder needs at least 10 patients")
        folder = write_public(Path(args.out) / "public", run, args.public)
        log.info("wrote the public folder %s (%d patients, synth.seed %d)", folder, args.public, run.synth.seed)
        return 0
    if args.sites is None:
        raise ConfigError("synth needs --sites N (site folders and a held-out folder) or --public N")
    folders = write_federation(Path(args.out), run, args.sites)
    log.info("wrote %d site folders and a held-out folder under %s", len(folders) - 1, args.out)
    return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    from medfusion_fl.data import check_site

    run = _run_config(args)
    records, problems = check_site(Path(args.folder), run.data)
    for problem in problems:
        sys.stdout.write(f"{args.folder}: {problem}\n")
    status = "FAILED" if problems else "OK"
    sys.stdout.write(f"{status}: {len(records)} usable patient(s), {len(problems)} problem(s) in {args.folder}\n")
    return 1 if problems else 0


def cmd_site_status(args: argparse.Namespace) -> int:
    from medfusion_fl.privacy import PrivacyLedger

    ledger = PrivacyLedger(Path(args.state_dir), head=Path(args.ledger_head) if args.ledger_head else None)
    if not ledger.path.exists() and not ledger.head.exists():
        sys.stdout.write(f"{ledger.path}: no privacy ledger yet (this site has taken no DP steps)\n")
        return 0
    for federation in ledger.federations():
        spent = ledger.epsilon(federation, delta=args.delta, accountant=args.accountant)
        sys.stdout.write(f"federation {federation!r}: epsilon {spent:.4f} of {args.max_epsilon:g} at delta "
                         f"{args.delta:g} ({args.accountant}); remaining {max(args.max_epsilon - spent, 0):.4f}\n")
        for entry in ledger.entries(federation):
            sys.stdout.write(f"  round {entry.round:>4}  {entry.kind:<8}  noise {entry.noise_multiplier:g}  sample "
                             f"rate {entry.sample_rate:.5f}  steps {entry.steps:>6}  at {entry.recorded_at}\n")
    sys.stdout.write(f"{ledger.path}: hash chain intact, head {ledger.head}\n")
    return 0


def cmd_site_run(args: argparse.Namespace) -> int:
    from medfusion_fl.deploy.site_agent import describe, load_agent

    agent = load_agent(Path(args.config), parse_overrides(args.set or []))
    patients = agent.check()
    policy = agent.site.policy
    log.info("%s: %d usable patient(s) in %s; budget epsilon %g at delta %g (federation %r)", agent.site.site_id,
             patients, agent.site.data_path, policy.max_epsilon, policy.delta, agent.site.federation)
    for line in policy.relaxed():
        log.warning("%s: %s", agent.site.site_id, line)
    agent.check_state()
    if args.dry_run:
        sys.stdout.write(describe(agent) + "\n")
        return 0
    log.info("starting %s", describe(agent))
    return agent.start()


def cmd_site_import_dicom(args: argparse.Namespace) -> int:
    from medfusion_fl.data.dicom_import import import_dicom

    run = _run_config(args)
    report = import_dicom(Path(args.src), Path(args.out), run.data, rules_path=Path(args.rules),
                          clinical=Path(args.clinical) if args.clinical else None, id_column=args.id_column,
                          salt_file=Path(args.salt_file) if args.salt_file else None)
    for problem in report.problems:
        sys.stdout.write(f"skipped {problem}\n")
    sys.stdout.write(f"imported {report.patients} patient(s) into {args.out}; views {report.views}; "
                     f"{report.masks} lesion mask(s) from DICOM SEG; {len(report.problems)} problem(s) listed above\n")
    return 0


def cmd_site_import_nifti(args: argparse.Namespace) -> int:
    from medfusion_fl.data.nifti_import import import_nifti

    run = _run_config(args)
    patients, problems = import_nifti(Path(args.src), Path(args.out), run.data, view=args.view,
                                      clinical=Path(args.clinical), id_column=args.id_column,
                                      salt_file=Path(args.salt_file) if args.salt_file else None,
                                      labels=Path(args.labels) if args.labels else None)
    for problem in problems:
        sys.stdout.write(f"note {problem}\n")
    sys.stdout.write(f"imported {patients} patient(s) into {args.out}; {len(problems)} note(s) listed above\n")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from medfusion_fl.deploy.certs import make_certs

    report = make_certs(Path(args.out), hosts=args.host or [], sites=args.site or [])
    log.info("%d file(s) created, %d kept under %s", len(report.created), len(report.kept), args.out)
    return 0


def _preset_config(args: argparse.Namespace, under: dict[str, Any] | None = None,
                   over: dict[str, Any] | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """The run config of a preset (then `under`, --config, `over`, --set) and the preset's [simulation] table
    (+ --set simulation.*)."""
    preset = presets.read_preset(presets.find_app(args.app), args.preset)
    sets = args.set or []
    simulation = {k.removeprefix("simulation."): v for k, v in parse_overrides(sets).items()
                  if k.startswith("simulation.")}
    args.set = [item for item in sets if not item.strip().startswith("simulation.")]
    run = _run_config(args, {**flatten(preset.get("config", {})), **(under or {})}, over)
    return run, presets.simulation_table(preset, simulation)


def _write_site_policies(root: Path, specs: list[str], num_sites: int) -> None:
    """--site-policy [SITE=]FILE: the simulated sites' stand-in for site.toml's [policy] (rewritten each run)."""
    from medfusion_fl.site_config import POLICY_FOLDER, read_policy_file

    folder = root / POLICY_FOLDER
    for old in folder.glob("*.toml") if folder.is_dir() else []:
        old.unlink()
    sites = [f"site-{k}" for k in range(num_sites)]
    for spec in specs:
        site, sep, file = spec.rpartition("=")
        targets = [site] if sep else sites
        if sep and site not in sites:
            raise ConfigError(f"--site-policy {spec!r}: no simulated site {site!r}; the sites are {sites}")
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--site-policy {spec!r}: {path} does not exist")
        read_policy_file(path)  # unknown keys refused now, not at the first round
        folder.mkdir(parents=True, exist_ok=True)
        for target in targets:
            (folder / f"{target}.toml").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
            log.info("simulated %s: site policy from %s", target, path)


def cmd_simulate(args: argparse.Namespace) -> int:
    os.environ.update(FLOWER_ENV)
    app_dir = presets.find_app(args.app)
    out = Path(args.out)
    run, sim = _preset_config(args, {"data.sites-root": str(out / "data")}, {"output.run-dir": str(out)})
    num_sites = args.sites or int(sim.get("num-sites", 3))
    from medfusion_fl.preflight import check_run
    from medfusion_fl.runfolder import RunFolder

    check_run(run)  # an unknown backbone or a weights file that does not read: refused before any data is made
    RunFolder(run).open()  # a folder of another run or a damaged checkpoint is refused before Ray starts
    if run.data.source == "synthetic":
        from medfusion_fl.data import write_federation

        write_federation(Path(run.data.sites_root), run, num_sites)
    if int(sim.get("public-patients", 0)) > 0:
        run = public_start(run, out, int(sim["public-patients"]), int(sim.get("pretrain-epochs", 5)))
    _write_site_policies(Path(run.data.sites_root), args.site_policy or [], num_sites)
    sys.path.insert(0, str(app_dir))
    from simulations.runner import run_app

    start = time.monotonic()
    run_app(app_dir, run.to_flat(), num_sites=num_sites,
            cpus_per_site=float(sim.get("cpus-per-site", 1.0)),
            gpus_per_site=float(sim.get("gpus-per-site", 0.0)))
    from medfusion_fl import runcontrol

    paused = runcontrol.read(out).get("paused_after_round")
    if paused is not None:
        log.info("simulation paused after round %s: %s; continue it with --set output.resume=true", paused, out)
        return 0
    if not (out / "model.onnx").is_file():
        raise MedFusionError(f"the simulation ended without {out / 'model.onnx'}; see the log above.")
    status = json.loads((out / "model_card.json").read_text(encoding="utf-8")).get("run_status", {})
    early = status.get("status") == "ended early"
    log.log(logging.WARNING if early else logging.INFO, "simulation %s in %.1f s: %s, %s",
            f"ENDED EARLY after {status['rounds']} of {status['planned']} rounds ({status['reason']})" if early
            else "finished", time.monotonic() - start, out / "model.onnx", out / "model_card.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from medfusion_fl.export import export_checkpoint

    check = export_checkpoint(Path(args.checkpoint), Path(args.out))
    log.info("onnxruntime max |diff| %.2e on %s", check.max_abs_diff, check.input_source)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """The effective run config: defaults, then the preset, --config and --set, in that order."""
    run = _preset_config(args)[0] if args.preset else _run_config(args)
    flat, default = run.to_flat(), RunConfig().to_flat()
    for key in all_keys():
        note = f"  # default {default[key]!r}" if flat[key] != default[key] else ""
        sys.stdout.write(f"{key} = {flat[key]!r}{note}\n")
    for line in privacy_warnings(run):
        log.warning("%s", line)
    return 0


def cmd_site_audit(args: argparse.Namespace) -> int:
    from medfusion_fl.release.audit import FILENAME, verify

    target = Path(args.path)
    check = verify(target / FILENAME if target.is_dir() else target)
    def order(item: tuple[str, Any]) -> tuple[bool, int]:
        return item[0] == "None", int(item[0]) if item[0].isdigit() else 0

    for server_round, stages in sorted(check.bytes_by_round.items(), key=order):
        sys.stdout.write(f"round {server_round}: " + ", ".join(f"{k} {v} B" for k, v in sorted(stages.items()))
                         + "\n")
    total = sum(sum(stages.values()) for stages in check.bytes_by_round.values())
    if not check.ok:
        sys.stdout.write(f"BROKEN: {check.path} line {check.broken_line}: {check.problem}\n")
        return 1
    sys.stdout.write(f"OK: {check.path}: {check.messages} message(s), {total} B, hash chain intact\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfusion-fl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, help="TOML run config (a pyproject.toml or plain tables)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key")
        return p

    p = with_config(sub.add_parser("synth", help="write synthetic site folders + a held-out folder"))
    p.add_argument("--sites", type=int, help="site folders site-0 .. site-(N-1), and the held-out folder test")
    p.add_argument("--public", type=int, metavar="N", help="instead: OUT/public, N patients that are no site's (a "
                   "pretraining folder: give it its own --set synth.seed=... and synth.lesion-contrast=...)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_synth)
    site = sub.add_parser("site", help="hospital-side commands").add_subparsers(dest="site_command", required=True)
    p = with_config(site.add_parser("check", help="validate a site folder against the run's schema"))
    p.add_argument("folder")
    p.set_defaults(func=cmd_site_check)
    p = site.add_parser("status", help="print the site's privacy ledger and remaining budget")
    p.add_argument("state_dir", help="the site's state dir (node-config state-dir)")
    p.add_argument("--delta", type=float, default=1e-5, help="the site's delta (default 1e-5)")
    p.add_argument("--max-epsilon", type=float, default=8.0, help="the site's budget (default 8)")
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    p.add_argument("--ledger-head", help="the ledger head if not <state-dir>.ledger-head")
    p.set_defaults(func=cmd_site_status)
    p = site.add_parser("audit", help="verify the site's outbound audit log; bytes sent per round and stage")
    p.add_argument("path", help="the site's state dir, or its outbound_audit.jsonl")
    p.set_defaults(func=cmd_site_audit)
    p = site.add_parser("run", help="check the site's config and data, then start its Flower SuperNode")
    p.add_argument("--config", type=Path, required=True, help="the site's site.toml (docs/deployment.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key of [run]")
    p.add_argument("--dry-run", action="store_true", help="check, print the SuperNode command, do not start it")
    p.set_defaults(func=cmd_site_run)
    add_approval_commands(site)
    p = with_config(site.add_parser("import-dicom", help="a DICOM tree or DICOMDIR into a new site folder"))
    p.add_argument("src", help="a folder of DICOM files, a DICOMDIR file, or a folder holding one")
    p.add_argument("--out", required=True, help="the new site folder (never overwritten)")
    p.add_argument("--rules", required=True, help="TOML: how series map to the run's views (docs/data-import.md)")
    p.add_argument("--clinical", help="CSV with the label and clinical columns, one row per patient")
    p.add_argument("--id-column", default="PatientID", help="the clinical CSV's patient-id column")
    p.add_argument("--salt-file", help="the site's secret salt for patient ids (default: <OUT>.id-salt)")
    p.set_defaults(func=cmd_site_import_dicom)
    p = with_config(site.add_parser("import-nifti", help="NIfTI volumes (<patient id>.nii[.gz]) into a site folder"))
    p.add_argument("src", help="a folder of <patient id>.nii or .nii.gz files")
    p.add_argument("--out", required=True, help="the new site folder (never overwritten)")
    p.add_argument("--view", required=True, help="the view (of data.view-names) the volumes fill")
    p.add_argument("--labels", help="a folder of label volumes named as the volumes (non-zero = lesion): the "
                   "view's lesion masks")
    p.add_argument("--clinical", required=True, help="CSV with the label and clinical columns")
    p.add_argument("--id-column", default="PatientID", help="the clinical CSV's patient-id column")
    p.add_argument("--salt-file", help="the site's secret salt for patient ids (default: <OUT>.id-salt)")
    p.set_defaults(func=cmd_site_import_nifti)
    p = sub.add_parser("certs", help="create the federation CA, the SuperLink's TLS certificate and site keys")
    p.add_argument("--out", default="certs", help="folder for the key material (default: certs)")
    p.add_argument("--host", action="append", help="a host name or IP of the coordinator (repeatable)")
    p.add_argument("--site", action="append", help="a hospital name; creates sites/NAME/auth_key (repeatable)")
    p.set_defaults(func=cmd_certs)
    p = with_config(sub.add_parser("simulate", help="run a whole federation on this machine"))
    p.add_argument("--preset", default=presets.DEFAULT, help=presets.help_text(Path(".")))
    p.add_argument("--out", default="runs/demo", help="the run folder (default: runs/demo)")
    p.add_argument("--sites", type=int, help="number of simulated sites (default: the preset's; the same as "
                   "--set simulation.num-sites=N)")
    p.add_argument("--app", default=".", help="the app folder (default: current folder)")
    p.add_argument("--site-policy", action="append", metavar="[SITE=]FILE",
                   help="a simulated site's policy: the [policy] table of FILE (a site.toml), for SITE (site-0, ...) "
                        "or for every site; repeatable")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("export", help="export a checkpoint to model.onnx + model_card.json")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
    add_report_commands(sub)
    add_pretrain_commands(sub)
    add_console_commands(sub)
    config = sub.add_parser("config", help="run configuration").add_subparsers(dest="config_command", required=True)
    p = with_config(config.add_parser("show", help="print the effective value of every config key"))
    p.add_argument("--preset", help="apply a simulation preset first (as `simulate --preset` does)")
    p.add_argument("--app", default=".", help="the app folder holding simulations/presets (default: current folder)")
    p.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv)[0]


def _main(argv: Sequence[str] | None) -> tuple[int, bool]:
    """The exit code, and whether a simulation's runtime was stopped under it (its processes killed)."""
    args = _parser().parse_args(argv)
    ensure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args)), False
    except (RunStopped, SimulationFailed) as exc:
        log.error("%s", exc)
        return (exc.exit_code if isinstance(exc, RunStopped) else 1), True
    except MedFusionError as exc:
        log.error("%s", exc)
        return 1, False
    finally:
        # what the command built stays alive until the process ends; without this, the interpreter's last
        # collection walks it all (after a simulation: torch.export's graphs, Ray's state), 5 s on 2 cores
        gc.freeze()


def entry() -> int:
    """The `medfusion-fl` command: main(), and an exit that no stuck thread can hold up. A simulation stopped by a
    signal or a crashed runtime gives its coordinator thread a few seconds (simulations/runner.GRACE_S); one still
    busy after that (say, inside an ONNX export) would keep the interpreter from exiting. Everything the run
    wrote is written atomically, so leaving then loses nothing. The same exit follows a stopped or crashed
    simulation, whose Ray processes were killed: the interpreter's teardown would then wait seconds on Ray's native
    state and could die in it, hiding the exit code that says why the run ended."""
    code, runtime_stopped = _main(None)
    stuck = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    if stuck:
        log.warning("exiting with %d thread(s) still running (%s)", len(stuck), ", ".join(stuck))
    if stuck or runtime_stopped:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
