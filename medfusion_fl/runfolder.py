"""Opening a run folder before anything starts: a fresh run never mixes with an earlier one, and a resumed
run continues from an intact checkpoint of its own run.

`<run-dir>/run.json` names the run (a random id) the folder holds; every checkpoint carries that id. A
fresh run into a folder that holds a run is refused, or with output.overwrite the old run is moved aside,
whole, to `<run-dir>.replaced-<UTC time>`. A resume checks every checkpoint from the newest down and names
the newest intact one when the latest is damaged; resuming from an older one moves the newer checkpoints
and metrics lines aside (`checkpoints/superseded/`, `metrics.superseded.jsonl`), never deleting them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

from medfusion_fl.config import RunConfig
from medfusion_fl.durable import append_jsonl_atomic, write_json_atomic, write_jsonl_atomic
from medfusion_fl.errors import CheckpointError, ConfigError
from medfusion_fl.runstore import Checkpoint, RunStore, checkpoint_round, load_checkpoint

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
RUN_FORMAT = "medfusion-fl-run/1"
OUTPUTS = ("metrics.jsonl", "checkpoints", "model.onnx", "model.safetensors", "model_card.json", "site-state",
           "tensorboard", RUN_FILE)
LOCATION_KEYS = ("sites_root", "test_path")  # where the data is, not what it is: a moved run folder resumes


def config_mismatch(trained: RunConfig, run: RunConfig) -> str | None:
    """The first section whose keys differ between a checkpoint's config and this run's (None: resumable).
    The data section is compared without its folder locations; synth only for synthetic data."""
    for section in ("model", "data", "synth", "strategy"):
        if section == "synth" and run.data.source != "synthetic":
            continue
        old, new = getattr(trained, section).model_dump(), getattr(run, section).model_dump()
        if section == "data":
            old, new = ({k: v for k, v in d.items() if k not in LOCATION_KEYS} for d in (old, new))
        if old != new:
            changed = [f"{section}.{k.replace('_', '-')}" for k in sorted(new) if old.get(k) != new[k]]
            return f"{section} ({', '.join(changed)})"
    return None


def read_init(run_dir: Path) -> dict[str, object]:
    """run.json's record of where the run's initial model came from ({} if none)."""
    try:
        doc = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    init = doc.get("init") if isinstance(doc, dict) else None
    return init if isinstance(init, dict) else {}


class RunFolder:
    """The run folder of one run, checked by `open()` at the coordinator before it waits for any site."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.store = RunStore(Path(run.output.run_dir))
        self.root = self.store.root
        self.run_file = self.root / RUN_FILE
        self.id = ""  # this run's id, known after open()

    def run_id(self) -> str | None:
        if not self.run_file.is_file():
            return None
        try:
            doc = json.loads(self.run_file.read_text(encoding="utf-8"))
            return str(doc["run_id"]) if doc.get("format") == RUN_FORMAT else None
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{self.run_file} is unreadable; it names the run this folder holds. Restore "
                                  "it from a backup, or move the folder aside and start a fresh run.") from None

    def outputs(self) -> list[str]:
        """What of an earlier run this folder holds (run.json alone, written before round 1, is not a run)."""
        found = [name for name in OUTPUTS if name != RUN_FILE and (self.root / name).exists()]
        if "checkpoints" in found and not any((self.root / "checkpoints").iterdir()):
            found.remove("checkpoints")
        return found

    def open(self) -> Checkpoint | None:
        """Check the folder for this run; returns the checkpoint to resume from (None: start at round 1)."""
        if self.run.output.resume:
            from medfusion_fl import runcontrol

            runcontrol.clear(self.root)  # a resume ends a pause
            return self._resume()
        held = self.outputs()
        if held:
            if not self.run.output.overwrite:
                raise ConfigError(f"run folder {self.root} already holds a run ({', '.join(held)}). Set "
                                  "output.resume = true to continue it, output.overwrite = true to move it aside "
                                  f"to {self.root.name}.replaced-<time>, or choose another output.run-dir (--out).")
            self._move_aside()
        self._ensure_run_id()
        return None

    def _ensure_run_id(self, run_id: str | None = None) -> None:
        current = self.run_id()
        if current is None:
            current = run_id or uuid.uuid4().hex
            write_json_atomic(self.run_file, {"format": RUN_FORMAT, "run_id": current,
                                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.id = current

    def record_flower_run(self, flower_run_id: int) -> None:
        """Note Flower's own id of the run now writing this folder (a resume adds its own): what `flwr stop`
        takes, so the console can stop a deployment run it did not start."""
        doc = json.loads(self.run_file.read_text(encoding="utf-8"))
        write_json_atomic(self.run_file, {**doc, "flower_run_id": int(flower_run_id)})

    def record_init(self, provenance: dict[str, object]) -> None:
        """Note where the run's initial model came from (init.*): a resume, `export` and the card read it here."""
        doc = json.loads(self.run_file.read_text(encoding="utf-8"))
        write_json_atomic(self.run_file, {**doc, "init": provenance})

    def init_record(self) -> dict[str, object]:
        """The provenance of the run's initial model ({} for runs from before it was recorded)."""
        return read_init(self.root)

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.root.with_name(f"{self.root.name}.replaced-{stamp}")
        keep = {Path(self.run.data.sites_root).resolve(), *([Path(self.run.data.test_path).resolve()]
                                                             if self.run.data.test_path else [])}
        target.mkdir(parents=True)
        for entry in sorted(self.root.iterdir()):
            resolved = entry.resolve()
            if any(k == resolved or k.is_relative_to(resolved) for k in keep):
                continue  # the sites' data folder (simulation) stays where the run reads it
            shutil.move(str(entry), str(target / entry.name))
        log.warning("output.overwrite: the earlier run in %s was moved aside to %s", self.root, target)

    def _check(self, path: Path, run_id: str | None, checkpoint: Checkpoint | None = None) -> Checkpoint:
        checkpoint = checkpoint or load_checkpoint(path)
        if run_id is not None and checkpoint.run_id and checkpoint.run_id != run_id:
            raise CheckpointError(f"{path} belongs to run {checkpoint.run_id}, not to the run {run_id} of "
                                  f"{self.run_file}: it was copied from another run folder. Move it out, or "
                                  "resume that run from its own folder.")
        mismatch = config_mismatch(checkpoint.config, self.run)
        if mismatch:
            raise CheckpointError(f"{path} was trained with another {mismatch} config; resume it with the same "
                                  "keys, or start over with output.resume = false and output.overwrite = true")
        return checkpoint

    def _resume(self) -> Checkpoint | None:
        found = self.store.list_checkpoints()
        run_id = self.run_id()
        wanted = self.run.output.resume_from
        if wanted:
            chosen = [p for p in found if p.name == wanted or p.name == f"{wanted}.pt"]
            if not chosen:
                raise ConfigError(f"output.resume-from = {wanted!r}: no such checkpoint in {self.store.checkpoints}"
                                  f"; there are {[p.name for p in found] or 'none'}")
            checkpoint = self._check(chosen[0], run_id)
        elif not found:
            log.info("output.resume: no checkpoint in %s yet; starting at round 1", self.root)
            self._ensure_run_id()
            return None
        else:
            try:
                loaded = load_checkpoint(found[-1])
            except CheckpointError as exc:  # damaged: name the newest intact one (another run's or config's: not)
                raise CheckpointError(f"{exc}\n{self._intact_hint(found[:-1], run_id)}") from None
            checkpoint = self._check(found[-1], run_id, loaded)
        self._ensure_run_id(checkpoint.run_id or None)
        if not checkpoint.run_id:
            log.warning("%s carries no run id (written before run ids); resuming it as this folder's run",
                        checkpoint.path)
        self._supersede(checkpoint.round)
        return checkpoint

    def _intact_hint(self, older: list[Path], run_id: str | None) -> str:
        reasons = []
        for path in reversed(older):
            try:
                self._check(path, run_id)
            except CheckpointError as exc:
                reasons.append(str(exc))
                continue
            return (f"The newest intact checkpoint is {path.name} (round {checkpoint_round(path)}): resume from it "
                    f"with --set output.resume-from={path.name} (newer checkpoints and metrics lines are moved "
                    "aside, not deleted).")
        why = f" ({reasons[0]})" if reasons else ""
        return (f"No older checkpoint can be resumed by this run{why}. Start over with output.resume = false and "
                "output.overwrite = true (the folder is moved aside, not deleted).")

    def _supersede(self, resumed: int) -> None:
        """Move what a resumed run will redo (checkpoints and completed rounds after `resumed`) aside."""
        newer = [p for p in self.store.list_checkpoints() if checkpoint_round(p) > resumed]
        if newer:
            aside = self.store.checkpoints / "superseded"
            aside.mkdir(exist_ok=True)
            for path in newer:
                path.replace(aside / path.name)
            log.warning("resuming from round %d: moved %s to %s", resumed, [p.name for p in newer], aside)
        lines = self.store.read_metrics()
        redo = [line for line in lines if line.get("round", 0) > resumed and line.get("status") == "ok"]
        if redo:
            old = self.root / "metrics.superseded.jsonl"
            for line in redo:  # first keep them, then drop them from metrics.jsonl
                append_jsonl_atomic(old, line)
            write_jsonl_atomic(self.store.metrics_path, [line for line in lines if line not in redo])
            log.warning("resuming from round %d: %d later metrics line(s) moved to %s", resumed, len(redo), old)
