"""The outbound audit log: a hash chain that names its first broken line, and what left the sites of a
federation run with the default config (in-process grid; tests/test_simulation.py does the same on Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.client_app import app
from medfusion_fl.cli import main
from medfusion_fl.config import RunConfig
from medfusion_fl.protocol import POLICY_REFUSED
from medfusion_fl.release.audit import FILENAME, HEAD, Item, OutboundAudit, read_lines, verify
from medfusion_fl.release.inventory import markdown_table
from medfusion_fl.runstore import RunStore
from server.federation import Federation
from simulations.inprocess import InProcessGrid
from tests.conftest import REPO, tiny_flat
from tests.release.outbound_checks import check_outbound


def _log(tmp_path: Path, lines: int = 4) -> Path:
    audit = OutboundAudit(tmp_path)
    for k in range(lines):
        audit.append(run=9, server_round=1 + k // 2, stage="train.secagg_mask", kind="reply",
                     items=[Item("secagg", "array", "masked", "uint32", (100,), 528)])
    return audit.path


def test_the_chain_names_the_first_broken_line(tmp_path: Path) -> None:
    path = _log(tmp_path)
    check = verify(path)
    assert check.ok and check.messages == 4 and check.bytes_by_round == {"1": {"train.secagg_mask (reply)": 1056},
                                                                         "2": {"train.secagg_mask (reply)": 1056}}
    original = path.read_bytes()
    lines = original.splitlines()
    lines[1] = lines[1].replace(b'"bytes":528', b'"bytes":529')  # an edit in the middle, totals kept consistent
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert (verify(path).broken_line, verify(path).problem) == (2, "its content does not match its hash: this "
                                                                   "line was changed")
    lines = original.splitlines()
    path.write_bytes(b"\n".join([lines[0], *lines[2:]]) + b"\n")  # a removed line
    assert verify(path).broken_line == 2 and "a line before it was removed" in verify(path).problem
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n")  # a dropped last line: only the head shows it
    assert verify(path).broken_line == 3 and HEAD in verify(path).problem
    path.write_bytes(original + b"not json\n")
    assert verify(path).broken_line == 5 and verify(path).problem == "not a JSON line"


def test_the_log_describes_a_reply_without_any_of_its_values(tmp_path: Path) -> None:
    """A reply with distinctive values in an array, a config value, a metric and a list: the audit line names
    each item with its dtype, shape and size, and not one of the values appears anywhere in the log's bytes."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.outbound import describe

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a Flower message needs

    secret = np.full((3, 5), 271828.18, np.float32)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(secret)}),
                          "privacy": ConfigRecord({"history": "PATIENT-0042-SECRET", "epsilon": 3.14159265}),
                          "shared": MetricRecord({"auroc": 0.918273645, "counts": [61803, 39887]})})
    kind, items = describe(Message(content=content, dst_node_id=1, message_type="train"))
    audit = OutboundAudit(tmp_path)
    audit.append(run=9, server_round=1, stage="train", kind=kind, items=items)
    text = audit.path.read_text()
    described = {(i["record"], i["key"]): (i["dtype"], i["shape"], i["bytes"])
                 for i in read_lines(audit.path)[0]["items"]}
    assert described == {("arrays", "w"): ("float32", [3, 5], len(Array(secret).data)),  # serialised size
                         ("privacy", "history"): ("str", [], 19),
                         ("privacy", "epsilon"): ("float", [], 8), ("shared", "auroc"): ("float", [], 8),
                         ("shared", "counts"): ("list[int]", [2], 16)}
    leaked = [v for v in ("271828", "PATIENT-0042", "3.14159", "0.918273", "61803", "39887") if v in text]
    leaked += [v for v in (secret.tobytes().hex()[:16],) if v in text]
    assert not leaked, leaked


def test_site_audit_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path, lines=3)
    assert main(["site", "audit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "round 1: train.secagg_mask (reply) 1056 B" in out and "OK:" in out and "3 message(s), 1584 B" in out
    path.write_bytes(path.read_bytes().replace(b'"seq":2', b'"seq":7'))
    assert main(["site", "audit", str(path)]) == 1
    assert "BROKEN:" in capsys.readouterr().out
    assert main(["site", "audit", str(tmp_path / "nowhere")]) == 1


def test_the_docs_list_the_inventory() -> None:
    assert markdown_table() in (REPO / "docs" / "design.md").read_text()


def test_what_left_the_sites_of_a_default_federation(synth_root: Path, tmp_path: Path) -> None:
    """Default config (DP, secure aggregation, default site policies), 4 sites, one of which refuses."""
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{"rounds.num-server-rounds": 1,
                                                     "data.sites-root": str(synth_root / "data")}))
    strict = {3: {"require-dp": True, "min-noise-multiplier": 3.0}}
    grid = InProcessGrid(app, run.to_flat(), num_nodes=4, node_config={"max-epsilon": 100.0}, per_node=strict)
    federation = Federation(run)
    federation.export(federation.run_rounds(grid))
    # the coordinator recorded site-3's refusals of training and evaluation and went on with the others
    line = RunStore(run.output.run_dir).read_metrics()[-1]
    assert line["status"] == "ok" and sorted(line["train"]["sites"]) == ["site-0", "site-1", "site-2"]
    assert line["evaluate"]["summed"] == ["site-0", "site-1", "site-2"]
    assert [(f["node_id"], f["stage"], f["code"]) for f in line["failures"]] == [(103, "secagg_advertise",
                                                                                 POLICY_REFUSED)] * 2
    assert [f["reason"].split(":")[0] for f in line["failures"]] == ["site-3 refuses train", "site-3 refuses evaluate"]
    card = json.loads((Path(run.output.run_dir) / "model_card.json").read_text())
    assert "min-noise-multiplier = 3.0" in card["privacy"]["refused_by_site_policy"]["node 103"]
    # the card lists each kind of figure with the epsilon it cost each site, training and evaluation apart
    sites = card["privacy"]["differential_privacy"]["sites"]
    spent = {row["messages"]: row["epsilon"] for row in card["privacy"]["released"] if row["keys"] == "masked"}
    assert spent == {"train.secagg_mask": {s: sites[s]["training"]["epsilon"] for s in sorted(sites)},
                     "evaluate.secagg_mask": {s: sites[s]["evaluation"]["epsilon"] for s in sorted(sites)}}
    assert all(0 < spent["evaluate.secagg_mask"][s] < sites[s]["epsilon"] for s in sites)
    # and what left each site
    states = Path(run.output.run_dir) / "site-state"
    for k in range(3):
        lines = check_outbound(states / f"site-{k}")
        replies = [m for m in grid.received if m.metadata.src_node_id == 100 + k]
        assert len(lines) == len(replies) == 8  # 4 stages of training, 4 of evaluation: every reply recorded
        assert [line["stage"] for line in lines[:4]] == [f"train.secagg_{s}" for s in
                                                         ("advertise", "share", "mask", "unmask")]
        assert all(line["round"] == 1 and line["kind"] == "reply" for line in lines)
    refused = check_outbound(states / "site-3")
    assert [(line["kind"], [i["key"] for i in line["items"]]) for line in refused] == [
        ("error", ["code", "reason"])] * 2  # its refusals of training and evaluation, nothing else
    assert {m.error.code for m in grid.received if m.metadata.src_node_id == 103} == {POLICY_REFUSED}
    assert not (states / "site-3" / FILENAME).with_name("privacy_ledger.jsonl").exists()
