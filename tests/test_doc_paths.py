"""Every test file that a docstring, comment or doc of this repository names exists: a cited test that was renamed
or never written misleads whoever goes to read it. A path inside another project's tree (opacus/tests/...) is
that project's, not ours."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

# tests/<folders>/<name>.py, not preceded by a path character (which would make it another tree's path)
CITED = re.compile(r"(?<![\w/.-])tests/[\w/]+\.py")


def _tracked() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.sh", "*.cfg"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


def test_every_cited_test_file_exists() -> None:
    missing = sorted({f"{name}: {path}" for name in _tracked()
                      for path in CITED.findall((REPO / name).read_text(encoding="utf-8", errors="replace"))
                      if not (REPO / path).is_file()})
    assert not missing, missing


def test_the_pattern_finds_our_paths_and_skips_another_trees() -> None:
    text = "see tests/strategy/test_mean.py and (tests/conftest.py); opacus/tests/accountants_test.py is theirs"
    assert CITED.findall(text) == ["tests/strategy/test_mean.py", "tests/conftest.py"]
