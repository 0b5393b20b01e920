"""The FAB every site receives holds the app's own sources and nothing else a user left in the folder."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

from medfusion_fl.approval import read_fab
from medfusion_fl.approval.fab import build_app
from tests.conftest import REPO

# What a user of the README leaves in the app folder: outputs with patient-level figures, policy files, notes
STRAY = {
    "exported/model_card.json": '{"sites": ["site-0"]}',
    "eval/report/evaluation.json": '{"patients": 300}',
    "maps/explanations.json": '{"s1-p0001": {"label": "positive", "probability": 0.91}}',
    "runs/demo/metrics.jsonl": '{"round": 1}\n',
    "data/site-0/manifest.csv": "patient_id,label\ns0-p0000,positive\n",
    "strict.toml": "[policy]\nmax-epsilon = 4.0\n",
    "no-secagg.toml": "[policy]\nrequire-secure-aggregation = false\n",
    "scratch/try.py": "print('a user's own experiment')\n",
    "notes.md": "patient s1-p0001 looked odd\n",
    "server/notes.md": "to do\n",
    "client/site-0.yaml": "site: 0\n",
}


def _checkout(folder: Path) -> Path:
    """The tracked files of this repository (a clean checkout), copied to `folder`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_file():
            shutil.copyfile(REPO / name, target)
    return folder


def test_the_fab_holds_only_the_apps_own_sources(tmp_path: Path) -> None:
    clean = _checkout(tmp_path / "clean")
    expected = {"pyproject.toml", *(p.relative_to(clean).as_posix() for package in ("server", "client", "strategies")
                                    for p in (clean / package).glob("*.py"))}
    content = build_app(clean)
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        names = set(archive.namelist()) - {".info/CONTENT"}
    assert names == expected
    assert not any(name.startswith(("medfusion_fl/", "tests/", "bench/", "docs/", "simulations/")) for name in names)

    used = tmp_path / "used"
    shutil.copytree(clean, used)
    for name, text in STRAY.items():
        (used / name).parent.mkdir(parents=True, exist_ok=True)
        (used / name).write_text(text)
    stray_content = build_app(used)
    assert stray_content == content  # the same bytes: the hash each site approved does not move
    assert read_fab(stray_content).sha256 == read_fab(content).sha256
