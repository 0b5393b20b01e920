"""`medfusion-fl site run`: the hospital's config and folder are checked before its SuperNode starts."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from medfusion_fl.cli import main
from medfusion_fl.deploy.certs import make_certs
from medfusion_fl.deploy.site_agent import load_agent
from medfusion_fl.errors import ConfigError
from tests.conftest import REPO


def _site_toml(tmp_path: Path, data: Path, *, auth_key: str = "certs/sites/H1/auth_key") -> Path:
    make_certs(tmp_path / "certs", hosts=["127.0.0.1"], sites=["H1"])
    path = tmp_path / "site.toml"
    path.write_text(f"""
[site]
site-id = "H1"
data-path = "{data}"
state-dir = "state/h1"
federation = "test-federation"

[policy]
max-epsilon = 6.0
min-sites = 4

[superlink]
address = "127.0.0.1:9092"
root-certificates = "certs/ca.pem"
auth-key = "{auth_key}"
runtime-port = 9195

[run]
config = "{REPO / 'pyproject.toml'}"
""")
    return path


def test_dry_run_prints_the_supernode_command(synth_root: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = _site_toml(tmp_path, synth_root / "data" / "site-0")
    assert main(["site", "run", "--config", str(path), "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert Path(argv[0]).name == "flower-supernode"
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert flags["--superlink"] == "127.0.0.1:9092" and flags["--port"] == "9195"
    assert flags["--root-certificates"] == str(tmp_path / "certs" / "ca.pem")
    assert flags["--auth-supernode-private-key"] == str(tmp_path / "certs" / "sites" / "H1" / "auth_key")
    node = dict(item.split("=", 1) for item in shlex.split(flags["--node-config"]))
    assert node == {"site-id": "H1", "data-path": str(synth_root / "data" / "site-0"),
                    "state-dir": str(tmp_path / "state" / "h1"), "federation": "test-federation",
                    "max-epsilon": "6.0", "min-sites": "4"}  # the hospital's policy, as its own node-config


def test_a_site_with_bad_data_is_not_started(synth_root: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "site"
    shutil.copytree(synth_root / "data" / "site-1", data)
    sorted((data / "images").iterdir())[0].write_bytes(b"not an image")
    path = _site_toml(tmp_path, data)
    assert main(["site", "run", "--config", str(path), "--dry-run"]) == 1
    assert "flower-supernode" not in capsys.readouterr().out


def test_site_config_errors_name_the_key(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[superlink\] auth-key = 'missing/key'"):
        load_agent(_site_toml(tmp_path, synth_root / "data" / "site-0", auth_key="missing/key"))
    path = tmp_path / "bad.toml"
    path.write_text('[site]\ndata-path = "x"\n[superlink]\nadress = "a:1"\n')
    with pytest.raises(ConfigError, match=r"unknown \[superlink\] key\(s\) \['adress'\]"):
        load_agent(path)
    path.write_text('[site]\ndata-path = "x"\nmax-epsilon = 3.0\n[superlink]\naddress = "a:1"\ninsecure = true\n')
    with pytest.raises(ConfigError, match=r"\['max-epsilon'\] belong to the \[policy\] table"):
        load_agent(path)
    path.write_text('[site]\ndata-path = "x"\n[policy]\nmin-site = 2\n[superlink]\naddress = "a:1"\ninsecure = true\n')
    with pytest.raises(ConfigError, match=r"unknown \[policy\] key\(s\) \['min-site'\]"):
        load_agent(path)


def test_a_site_with_a_tampered_ledger_or_approval_list_is_not_started(
        synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medfusion_fl.privacy import DPStep, PrivacyLedger

    path = _site_toml(tmp_path, synth_root / "data" / "site-0")
    ledger = PrivacyLedger(tmp_path / "state" / "h1")
    for k in (1, 2, 3):
        ledger.record("test-federation", key=f"r{k}", round=k, step=DPStep(1.0, 0.1, 20))
    assert main(["site", "run", "--config", str(path), "--dry-run"]) == 0
    capsys.readouterr()
    ledger.path.write_bytes(ledger.path.read_bytes().splitlines(keepends=True)[0])  # rounds 2-3 removed
    assert main(["site", "run", "--config", str(path), "--dry-run"]) == 1
    out = capsys.readouterr()
    assert "flower-supernode" not in out.out and "failed its integrity check" in out.err
    ledger.path.unlink()
    (tmp_path / "state" / "h1.ledger-head").unlink()  # both gone: a site with no history
    (tmp_path / "site.approvals.jsonl").write_text("{not json\n")
    assert main(["site", "run", "--config", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "app approval list" in err and "failed its integrity check" in err


def test_a_site_asking_for_more_gpus_than_it_has_is_not_started(synth_root: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = _site_toml(tmp_path, synth_root / "data" / "site-0")
    path.write_text(path.read_text().replace('federation = "test-federation"',
                                             'federation = "test-federation"\ngpus = 4\ndevice = "cpu"'))
    assert main(["site", "run", "--config", str(path), "--dry-run"]) == 1
    out = capsys.readouterr()
    assert "flower-supernode" not in out.out
    assert "gpus = 4, but it trains on the CPU" in out.err and "site.toml" in out.err
