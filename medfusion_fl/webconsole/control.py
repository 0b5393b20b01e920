"""Starting and stopping simulations from the console: the config form's schema, per-key validation, the
`medfusion-fl simulate` processes the console started.

A run starts as its own process group (`medfusion-fl simulate --preset P --out <runs>/<name> --set ...`),
so stopping it stops Ray's workers too. A deployment run (`flwr run` against a SuperLink, its run folder
under --runs) is stopped through Flower's own `flwr stop <flower-run-id> <superlink>`: the ServerApp
notes its Flower run id in run.json, the console is told the connection name with --superlink.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from medfusion_fl import runcontrol
from medfusion_fl.config import RunConfig, all_keys
from medfusion_fl.config_base import kebab
from medfusion_fl.deploy.site_agent import FLOWER_ENV
from medfusion_fl.errors import ConfigError
from medfusion_fl.presets import presets

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FIXED = ("output.run-dir", "data.sites-root")  # the console places every run under its --runs folder
PATH_KEYS = ("data.test-path", "init.path", "output.resume-from")  # files or folders the coordinator would read
MODULE_KEYS = ("strategy.name",)  # module:Class makes the coordinator import that module
STOP_GRACE_S = 15.0


def schema() -> list[dict[str, Any]]:
    """Every run-config key with its default, type and description: what the start form is made of."""
    defaults = RunConfig().to_flat()
    out = []
    for section, model in RunConfig.model_fields.items():
        sub = model.annotation
        for name, field in sub.model_fields.items():  # type: ignore[union-attr]
            key = f"{section}.{kebab(name)}"
            out.append({"key": key, "default": defaults[key], "type": type(defaults[key]).__name__,
                        "description": field.description or "", "fixed": key in FIXED})
    return out


def field_errors(flat: dict[str, Any]) -> dict[str, str]:
    """Per key, what is wrong with it ('' for errors across keys); empty when the config is valid."""
    known = set(all_keys())
    errors = {key: f"unknown key (value {value!r})" for key, value in flat.items() if key not in known}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in known:
            section, _, name = key.partition(".")
            nested.setdefault(section, {})[name] = value
    try:
        RunConfig.model_validate(nested)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"][:2])
            errors[key] = f"{err['msg']} (value {flat.get(key, err.get('input'))!r})"
        return errors
    if not errors:
        try:
            RunConfig.from_flat(flat)  # the checks across keys (e.g. DP noise 0, fp16 with DP)
        except ConfigError as exc:
            errors[""] = str(exc)
    return errors


def _set_args(settings: dict[str, Any]) -> list[str]:
    """`--set KEY=VALUE` arguments of `simulate` (booleans as TOML writes them)."""
    out = []
    for key, value in settings.items():
        out += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return out


@dataclass
class Job:
    name: str
    folder: Path
    process: subprocess.Popen[bytes]
    started_by: str
    stopped_by: str | None = None  # who pressed stop (the console's own shutdown: "console")

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def ended(self) -> str | None:
        """How the process ended, in words ("exit code 1", "signal SIGTERM"); None while it runs."""
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"


class Jobs:
    """The simulations this console started, by run folder name."""

    def __init__(self, runs_dir: Path, app_dir: Path, superlink: str | None = None, *,
                 data_roots: tuple[Path, ...] = (), strategy_modules: tuple[str, ...] = ()) -> None:
        self.runs_dir, self.app_dir = Path(runs_dir), Path(app_dir)
        self.superlink = superlink  # the `flwr` connection name of the SuperLink deployment runs go through
        # what an admin lets operators name from the start form (`medfusion-fl console --data-root/--strategy-module`)
        self.data_roots = tuple(Path(root).resolve() for root in data_roots)
        self.strategy_modules = strategy_modules
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def refused(self, settings: dict[str, Any]) -> dict[str, str]:
        """Per key, why an operator may not set it so from the console: a path outside every --data-root (a run's
        held-out folder, weights or checkpoint, read by the coordinator), or a module:Class strategy from a
        module the admin has not listed with --strategy-module (the coordinator would import it)."""
        errors = {}
        for key in PATH_KEYS:
            value = str(settings.get(key) or "")
            if not value:
                continue
            real = Path(value).resolve()
            if not any(real == root or real.is_relative_to(root) for root in self.data_roots):
                roots = ", ".join(map(str, self.data_roots)) or "none: the console was started without --data-root"
                errors[key] = (f"{value!r} lies outside the folders the console may read data from ({roots}); an "
                               "admin starts the console with --data-root FOLDER to allow one")
        for key in MODULE_KEYS:
            value = str(settings.get(key) or "")
            module = value.partition(":")[0]
            if ":" in value and module not in self.strategy_modules:
                listed = ", ".join(self.strategy_modules) or "none"
                errors[key] = (f"{value!r} would make the coordinator import module {module!r}, which is not among "
                               f"the modules an admin allowed ({listed}; `medfusion-fl console --strategy-module "
                               "MODULE`); the built-in strategies need no module")
        return errors

    def folder(self, name: str) -> Path:
        """The run folder of `name` under --runs; a name that is not a plain folder name ('..', a slash, an
        empty one) is refused before anything is read or written."""
        if not NAME.match(name):
            raise ConfigError(f"run name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with one of the "
                              "first two")
        return self.runs_dir / name

    def start(self, name: str, preset: str, settings: dict[str, Any], who: str) -> Job:
        folder = self.folder(name)
        if folder.exists():
            raise ConfigError(f"run {name!r} exists already in {self.runs_dir}; pick another name")
        known = presets(self.app_dir)
        if preset not in known:
            raise ConfigError(f"preset {preset!r} unknown; the presets are {sorted(known)}")
        fixed = [k for k in settings if k in FIXED]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} are set by the console (the run lives in {folder})")
        command = [sys.executable, "-m", "medfusion_fl.cli", "simulate", "--app", str(self.app_dir),
                   "--preset", preset, "--out", str(folder)]
        return self._launch(name, command + _set_args(settings), who)

    def _launch(self, name: str, command: list[str], who: str) -> Job:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        log = (self.runs_dir / f".{name}.console.log").open("ab")
        env = {**os.environ, **FLOWER_ENV}
        process = subprocess.Popen(command, cwd=self.app_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        job = Job(name, self.runs_dir / name, process, who)
        with self.lock:
            self.jobs[name] = job
        return job

    def pause(self, name: str, who: str) -> None:
        """Ask the run to stop after its current round (runcontrol); any run under --runs, whoever started it."""
        folder = self.folder(name)
        if not (folder / "metrics.jsonl").is_file() and name not in self.jobs:
            raise ConfigError(f"no run {name!r} under {self.runs_dir}")
        runcontrol.request_pause(folder, by=who)

    def resume(self, name: str, who: str) -> Job:
        """Continue a stopped or paused run from its newest checkpoint, with that checkpoint's own config."""
        from medfusion_fl.runstore import RunStore, load_checkpoint  # torch: only when a run is resumed

        folder = self.folder(name)
        running = self.jobs.get(name)
        if running is not None and running.running:
            raise ConfigError(f"run {name!r} is still running; pause or stop it first")
        if (folder / "model_card.json").exists():
            raise ConfigError(f"run {name!r} has ended: it exported its model (model_card.json). A resume would "
                              "train and export over it; start a new run instead")
        latest = RunStore(folder).latest_checkpoint()
        if latest is None:
            raise ConfigError(f"run {name!r} has no checkpoint to resume from; start it again instead")
        checkpoint = load_checkpoint(latest)
        flat = {**checkpoint.config.to_flat(), "output.resume": True}
        command = [sys.executable, "-m", "medfusion_fl.cli", "simulate", "--app", str(self.app_dir),
                   "--out", str(self.runs_dir / name), "--sites", str(max(len(checkpoint.sites), 1))]
        return self._launch(name, command + _set_args({k: v for k, v in flat.items() if k not in FIXED}), who)

    def export(self, run: str, checkpoint: Path, who: str) -> Job:
        """`medfusion-fl export CHECKPOINT --out <run>/exports/<round-NNNN>` as a job named export-<run>-<round>."""
        out = self.runs_dir / run / "exports" / checkpoint.stem
        if out.exists():
            raise ConfigError(f"{out} exists already: version exports/{checkpoint.stem} is that export")
        name = f"export-{run}-{checkpoint.stem}"
        running = self.jobs.get(name)
        if running is not None and running.running:
            raise ConfigError(f"the export of {checkpoint.name} is running already (job {name})")
        command = [sys.executable, "-m", "medfusion_fl.cli", "export", str(checkpoint), "--out", str(out)]
        return self._launch(name, command, who)

    def stop(self, name: str, who: str = "console") -> Job | str:
        """A run this console started: SIGTERM to its process group, SIGKILL after STOP_GRACE_S. A deployment
        run (run.json names its Flower run id): `flwr stop ID SUPERLINK`; returns what flwr said."""
        self.folder(name)  # a plain name, before anything is looked up by it
        job = self.jobs.get(name)
        if job is None:
            return self._flwr_stop(name)
        if job.running:
            job.stopped_by = who
            os.killpg(job.process.pid, signal.SIGTERM)

            def finish() -> None:
                try:
                    job.process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(job.process.pid, signal.SIGKILL)
                    job.process.wait()

            threading.Thread(target=finish, daemon=True).start()
        return job

    def _flwr_stop(self, name: str) -> str:
        try:
            doc = json.loads((self.runs_dir / name / "run.json").read_text(encoding="utf-8"))
            flower_id = int(doc["flower_run_id"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"run {name!r} was not started by this console and its run.json names no Flower run "
                              "id; stop it where it was started") from None
        if self.superlink is None:
            raise ConfigError(f"run {name!r} is Flower run {flower_id}: start the console with --superlink NAME (the "
                              f"flwr connection of its SuperLink), or run `flwr stop {flower_id} NAME` yourself")
        flwr = shutil.which("flwr")
        if flwr is None:
            raise ConfigError("the `flwr` command is not on the console's PATH; install flwr where the console runs")
        done = subprocess.run([flwr, "stop", str(flower_id), self.superlink, "--format", "json"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **FLOWER_ENV}, check=False)
        said = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            raise ConfigError(f"`flwr stop {flower_id} {self.superlink}` failed (exit {done.returncode}): "
                              f"{said[-800:]}")
        return said

    def stop_all(self) -> None:
        for name, job in list(self.jobs.items()):
            if job.running:
                self.stop(name)
