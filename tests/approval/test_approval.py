"""A hospital runs only the apps it approved: FAB reading, the chained approval list, the CLI a hospital's
IT uses, the check a deployed site's ClientApp process makes before installing a FAB, and the same check
in simulation. (The real SuperLink/SuperNode run is tests/deploy/test_loopback.py.)"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.fab import Fab
from flwr.supercore.task_identity import TaskIdentity

from client.approval import app_hash, approval_mod
from medfusion_fl.approval import ApprovalList, SiteApps, check_app, parse_hash, read_fab
from medfusion_fl.approval.cli import initial_weights
from medfusion_fl.approval.clientapp import admit
from medfusion_fl.approval.fab import build_app
from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import AppNotApproved, ApprovalListDamaged, ConfigError
from medfusion_fl.protocol import APP_NOT_APPROVED
from medfusion_fl.site_config import SiteConfig
from tests.conftest import REPO

PYPROJECT = """[project]
name = "tinyapp"
version = "{version}"

[tool.flwr.app]
publisher = "hospital-test"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
"""


def _app(folder: Path, *, version: str = "1.0.0", body: str = "app = None\n") -> bytes:
    (folder / "tinyapp").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(version=version))
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "client.py").write_text(body)
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    return build_app(folder)


def _site(tmp_path: Path) -> Path:
    path = tmp_path / "H1.toml"
    path.write_text('[site]\nsite-id = "H1"\ndata-path = "data"\nstate-dir = "state/H1"\n')
    return path


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_fab_is_read_in_memory_and_bad_ones_are_named(tmp_path: Path) -> None:
    content = _app(tmp_path / "app")
    info = read_fab(content)
    assert (info.app_id, info.version, info.sha256) == ("hospital-test/tinyapp", "1.0.0",
                                                        hashlib.sha256(content).hexdigest())
    assert "tinyapp/client.py" in info.sources and ("tinyapp/client.py", 11) in info.files
    assert not (tmp_path / "app.fab").exists() and not list(tmp_path.glob("**/.info"))  # nothing unpacked
    with pytest.raises(ConfigError, match="not a zip archive"):
        read_fab(b"not a zip")
    with pytest.raises(ConfigError, match="lacks pyproject.toml or .info/CONTENT"):
        read_fab(_zip({"pyproject.toml": b"x"}))
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    with pytest.raises(ConfigError, match=r"tinyapp/client.py does not match the hash in .info/CONTENT"):
        read_fab(_zip({**files, "tinyapp/client.py": b"import os; os.system('upload images')\n"}))
    with pytest.raises(ConfigError, match="files not listed in .info/CONTENT"):
        read_fab(_zip({**files, "extra.py": b"x = 1\n"}))
    with pytest.raises(ConfigError, match="points outside the app folder"):
        read_fab(_zip({**files, "../evil.py": b"x = 1\n"}))
    for bad in ("1234", "g" * 64, "sha256:" + "a" * 63):
        with pytest.raises(ConfigError, match="not an app hash: expected 64 hex digits"):
            parse_hash(bad)
    assert parse_hash("SHA256:" + "A" * 64) == "a" * 64


def test_review_approve_revoke_as_hospital_it_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path)
    first = tmp_path / "v1.fab"
    first.write_bytes(_app(tmp_path / "app"))
    assert main(["site", "review", str(first), "--config", str(site)]) == 0
    out = capsys.readouterr().out
    sha1 = hashlib.sha256(first.read_bytes()).hexdigest()
    assert f"sha256   {sha1}" in out and "hospital-test/tinyapp 1.0.0" in out and "not approved at H1" in out
    assert "tinyapp/client.py" in out and "no other version of hospital-test/tinyapp is approved" in out
    assert main(["site", "approve", str(first), "--config", str(site), "--note", "CHG-1"]) == 0
    assert "approved sha256:" + sha1 in capsys.readouterr().out
    second = tmp_path / "v2.fab"
    second.write_bytes(_app(tmp_path / "app", version="1.1.0", body="app = None\nupload = True\n"))
    sha2 = hashlib.sha256(second.read_bytes()).hexdigest()
    assert main(["site", "review", str(second), "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "Python sources against the approved 1.0.0" in out and "+upload = True" in out
    assert "initial  not stated in the app's pyproject" in out  # the tiny app has no init.* defaults
    assert main(["site", "approve", str(second), "--config", str(site)]) == 0
    assert main(["site", "revoke", sha1, "--config", str(site), "--note", "superseded"]) == 0
    capsys.readouterr()
    assert main(["site", "approvals", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "1 app(s) approved; 3 entries" in out and sha2 in out and sha1 not in out
    assert main(["site", "review", sha2, "--config", str(site)]) == 0  # by hash, from the site's app store
    assert "APPROVED at H1" in capsys.readouterr().out
    assert main(["site", "revoke", sha1, "--config", str(site)]) == 1  # not approved any more
    assert main(["site", "review", "f" * 64, "--config", str(site)]) == 1  # not in the store
    listing = (tmp_path / "H1.approvals.jsonl").read_text()
    assert '"note":"CHG-1"' in listing and '"action":"revoke"' in listing
    assert (tmp_path / "state" / "H1" / "approvals.head").is_file()  # the head lives in the state folder


@pytest.mark.parametrize("tamper", ["edit", "drop-revocation", "garbage", "delete-head"])
def test_a_damaged_approval_list_runs_nothing(tmp_path: Path, tamper: str) -> None:
    apps = SiteApps.of_site_file(_site(tmp_path))
    info = read_fab(_app(tmp_path / "app"))
    approvals = ApprovalList(apps)
    approvals.approve(info)
    approvals.revoke(info.sha256)
    lines = apps.approvals.read_bytes().splitlines(keepends=True)
    if tamper == "edit":
        apps.approvals.write_bytes(lines[0] + lines[1].replace(b'"revoke"', b'"approve"'))
    elif tamper == "drop-revocation":  # the revoked app would be approved again
        apps.approvals.write_bytes(lines[0])
    elif tamper == "garbage":
        apps.approvals.write_bytes(b"{not json\n")
    else:
        apps.head.unlink()
    with pytest.raises(ApprovalListDamaged, match="failed its integrity check.*No app is run at H1"):
        check_app(apps, info.sha256)


def _fab(content: bytes, announced: str | None = None) -> Fab:
    return Fab(announced or hashlib.sha256(content).hexdigest(), content, {})


def test_the_deployed_check_keeps_an_unapproved_fab_unopened_and_refuses_it(
        tmp_path: Path, package_log: pytest.LogCaptureFixture) -> None:
    site_file = _site(tmp_path)
    apps = SiteApps.of_site_file(site_file)
    site = SiteConfig(site_id="H1", data_path=tmp_path / "data", state_dir=tmp_path / "state" / "H1")
    content = _app(tmp_path / "app")
    sha = hashlib.sha256(content).hexdigest()
    with pytest.raises(AppNotApproved, match=rf"app sha256:{sha[:12]}\.\.\. is not approved at site H1 "
                                             r"\(medfusion-fl site review / approve\)"):
        admit(site, apps, _fab(content))
    assert (apps.store / f"{sha}.fab").read_bytes() == content and not list(apps.store.glob("*/"))
    with pytest.raises(AppNotApproved, match="not to the announced"):
        admit(site, apps, _fab(content, announced="0" * 64))
    with pytest.raises(AppNotApproved, match="is not a valid FAB"):
        admit(site, apps, _fab(b"not a zip"))
    ApprovalList(apps).approve(read_fab(content))
    assert admit(site, apps, _fab(content)) == sha
    other = _app(tmp_path / "app2", body="app = 'changed'\n")
    open_site = site.model_copy(update={"policy": site.policy.model_copy(update={"require_approved_app": False})})
    package_log.clear()
    assert admit(open_site, apps, _fab(other)) == hashlib.sha256(other).hexdigest()
    assert "runs unreviewed (site policy require-approved-app = false)" in package_log.text
    assert any("require-approved-app = False" in line for line in open_site.policy.relaxed())


def test_a_simulated_site_whose_policy_asks_checks_the_app(tmp_path: Path) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as Flower sets it in a task
    run = RunConfig.from_flat({"data.sites-root": str(tmp_path / "data"), "output.run-dir": str(tmp_path / "run")})
    policies = tmp_path / "data" / "policies"
    policies.mkdir(parents=True)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                      run_config=run.to_flat())
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    served: list[str] = []

    def handler(m: Message, c: Context) -> Message:
        served.append(m.metadata.message_type)
        return Message(RecordDict(), reply_to=m)

    assert not approval_mod(msg, context, handler).has_error()  # no policy file: the local folder's own code
    (policies / "site-1.toml").write_text("[policy]\nrequire-approved-app = true\n")
    reply = approval_mod(msg, context, handler)
    assert reply.has_error() and reply.error.code == APP_NOT_APPROVED and "not approved at site site-1" in \
        reply.error.reason and served == ["train"]
    apps = SiteApps.of_site_file(policies / "site-1.toml")
    assert apps.approvals == policies / "site-1.approvals.jsonl"
    with zipfile.ZipFile(io.BytesIO(build_app(Path(__file__).resolve().parents[2]))) as archive:
        assert "client/approval.py" in archive.namelist()
    ApprovalList(apps).chain.append({"action": "approve", "sha256": app_hash(), "app": "medfusion-fl/medfusion-fl",
                                     "version": "0.1.0", "note": "", "by": "test"})
    assert not approval_mod(msg, context, handler).has_error() and served == ["train", "train"]


def test_review_shows_what_the_app_starts_the_model_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path)
    app = tmp_path / "app"
    _app(app)
    sha = "ab" * 32
    with (app / "pyproject.toml").open("a") as handle:
        handle.write(f'\n[tool.flwr.app.config]\n"init.source" = "timm"\n"init.path" = "weights/rn50gn.pth"\n'
                     f'"init.sha256" = "{sha}"\n"model.backbone" = "resnet50_gn"\n')
    assert main(["site", "review", str(app), "--config", str(site)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("initial"))
    assert f"init.source = 'timm', init.path = 'weights/rn50gn.pth', init.sha256 = '{sha}'" in line
    assert "model.backbone = 'resnet50_gn'" in line and "--run-config" in line
    # the real app: its defaults, as every site reviewing it sees them
    assert "init.source = 'random'" in initial_weights(read_fab(build_app(REPO)))
