"""A hospital installs what a hospital runs: the web console's server packages are the `console` extra, and
everything a site or a coordinator without the console runs works where they are missing."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from medfusion_fl.webconsole.cli import CONSOLE_MODULES
from tests.conftest import REPO

BLOCKER = '''import sys
class Block:  # as if these packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ImportError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, Block())
'''


def _without_console(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(BLOCKED=set(CONSOLE_MODULES) | {"starlette"}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                          check=False)


def test_the_console_packages_are_an_extra_that_dev_installs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    extra = {dep.split(">")[0].strip() for dep in project["optional-dependencies"]["console"]}
    assert extra == {"fastapi", "uvicorn", "sqlalchemy", "argon2-cffi", "websockets"} and not core & extra
    assert "medfusion-fl[console]" in project["optional-dependencies"]["dev"]  # the README's install has it all


def test_a_site_runs_without_the_console_packages_and_the_console_names_its_extra(tmp_path: Path) -> None:
    blocked = _without_console(tmp_path, "-c", "import fastapi")
    assert blocked.returncode != 0 and "No module named 'fastapi'" in blocked.stderr  # the blocker works
    modules = _without_console(tmp_path, "-c", "import client.client_app, server.server_app, medfusion_fl.site, "
                               "medfusion_fl.export, medfusion_fl.cli; print('imported')")
    assert modules.stdout.strip() == "imported", modules.stderr[-2000:]
    shown = _without_console(tmp_path, "-m", "medfusion_fl.cli", "config", "show", "--preset", "tiny-cpu")
    assert shown.returncode == 0 and "privacy.enabled = True" in shown.stdout, shown.stderr[-2000:]
    console = _without_console(tmp_path, "-m", "medfusion_fl.cli", "console", "--runs", str(tmp_path))
    assert console.returncode == 1
    assert ("the console needs fastapi, uvicorn, sqlalchemy, argon2, websockets, which this install lacks (a site's "
            "install leaves them out): pip install 'medfusion-fl[console]'") in console.stderr
