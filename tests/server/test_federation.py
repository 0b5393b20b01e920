"""The coordinator's round loop over an in-process grid: failures, checkpoints, metrics, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.client_app import app as client_app
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import RoundFailed
from medfusion_fl.report.calibration import scale_threshold
from medfusion_fl.runfolder import RunFolder
from medfusion_fl.runstore import RunStore, load_checkpoint
from server.federation import Federation
from server.sites import SiteDirectory, sample, wait_for_sites
from simulations.inprocess import InProcessGrid
from tests.conftest import OPEN_POLICY, PLAIN, tiny_flat


@pytest.fixture
def broken_site2(synth_root: Path, tmp_path: Path) -> Path:
    """A copy of the federation in which site-2 has a corrupted image."""
    shutil.copytree(synth_root / "data", tmp_path / "data")
    image = sorted((tmp_path / "data" / "site-2" / "images").iterdir())[0]
    image.write_bytes(b"\x89PNG truncated")
    return tmp_path


def _run(root: Path, **overrides: object) -> RunConfig:
    return RunConfig.from_flat(tiny_flat(root, **{"rounds.num-server-rounds": 2, **PLAIN, **overrides}))


def test_bad_site_is_recorded_and_the_federation_goes_on(broken_site2: Path) -> None:
    run = _run(broken_site2)
    grid = InProcessGrid(client_app, run.to_flat(), num_nodes=3, node_config={**OPEN_POLICY, "share-metrics": True})
    federation = Federation(run)
    final = federation.run_rounds(grid)
    federation.export(final)
    store = RunStore(run.output.run_dir)
    lines = store.read_metrics()
    assert [line["round"] for line in lines] == [1, 2] and all(line["status"] == "ok" for line in lines)
    for line in lines:
        assert sorted(line["train"]["sites"]) == ["site-0", "site-1"]
        assert {f["node_id"] for f in line["failures"]} == {102}
        assert all("site-2" in f["reason"] and "row " in f["reason"] for f in line["failures"])
        assert line["held_out"]["auroc"] is not None and line["wall_time_s"] > 0
        assert line["evaluate"]["loss"] is not None
        threshold = line["evaluate"]["threshold"]  # chosen on the sites' pooled validation histograms
        assert 0 < threshold < 1 and line["held_out"]["threshold"] == threshold
        assert 0 <= line["held_out"]["sensitivity"] <= 1 and 0 <= line["held_out"]["accuracy-at-threshold"] <= 1
    assert [p.name for p in store.list_checkpoints()] == ["round-0001.pt", "round-0002.pt"]
    checkpoint = load_checkpoint(store.latest_checkpoint())
    assert checkpoint.round == 2 and checkpoint.sites == ["site-0", "site-1"]
    card = json.loads((store.root / "model_card.json").read_text())
    assert card["sites"] == ["site-0", "site-1"] and card["export_check"]["max_abs_diff"] <= 1e-4
    operating, temperature = card["operating_threshold"], card["calibration"]["value"]
    assert operating["before_calibration"] == lines[-1]["evaluate"]["threshold"]  # mapped through the temperature:
    assert operating["value"] == pytest.approx(scale_threshold(operating["before_calibration"], temperature), abs=5e-7)
    assert card["report"]["page"] == "report/report.html" and (store.root / "report" / "report.html").is_file()
    shared = lines[-1]["evaluate"]["sites"]  # share-metrics: each site's figures at the previous round's threshold
    assert set(shared) == {"site-0", "site-1"}
    assert all(f["eval-threshold"] == lines[0]["evaluate"]["threshold"] and 0 <= f["eval-ece"] <= 1
               and 0 <= f["eval-sensitivity"] <= 1 for f in shared.values())
    table = json.loads((store.root / "report" / "evaluation.json").read_text())["sites"]
    assert table["round"] == 2 and set(table["shared"]) == {"site-0", "site-1"} and table["not_shared"] == []
    assert (store.root / "model.onnx").stat().st_size > 0


def test_too_few_valid_updates_fail_loudly_and_keep_earlier_results(broken_site2: Path, synth_root: Path) -> None:
    good = _run(broken_site2, **{"rounds.num-server-rounds": 1,
                                 "data.sites-root": str(synth_root / "data")})
    Federation(good).run_rounds(InProcessGrid(client_app, good.to_flat(), num_nodes=3, node_config=OPEN_POLICY))
    store = RunStore(good.output.run_dir)
    before = store.metrics_path.read_bytes()
    strict = _run(broken_site2, **{"rounds.min-sites": 3, "output.resume": True})  # round 2, site-2 broken now
    with pytest.raises(RoundFailed, match="2 valid update.*min-sites = 3.*global model is unchanged"):
        Federation(strict).run_rounds(InProcessGrid(client_app, strict.to_flat(), num_nodes=3, node_config=OPEN_POLICY))
    after = store.metrics_path.read_bytes()
    assert after.startswith(before)  # the earlier line is intact
    failed = store.read_metrics()[-1]
    assert failed["status"] == "failed" and failed["failures"][0]["node_id"] == 102
    assert load_checkpoint(store.latest_checkpoint()).round == 1  # no checkpoint for the failed round


def test_silent_site_times_out_and_is_named(synth_root: Path, tmp_path: Path) -> None:
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{"rounds.num-server-rounds": 1, **PLAIN,
                                                      "data.sites-root": str(synth_root / "data")}))
    grid = InProcessGrid(client_app, run.to_flat(), num_nodes=3, silent=[1], node_config=OPEN_POLICY)
    Federation(run).run_rounds(grid)
    failures = RunStore(run.output.run_dir).read_metrics()[0]["failures"]
    assert {(f["node_id"], f["stage"]) for f in failures} == {(101, "train"), (101, "evaluate")}
    assert "no reply within" in failures[0]["reason"]


def test_waiting_for_sites_is_bounded() -> None:
    class Empty:
        def get_node_ids(self) -> list[int]:
            return [5]

    with pytest.raises(RoundFailed, match=r"only 1 site\(s\) connected within 0.2 s"):
        wait_for_sites(Empty(), minimum=2, timeout=0.2, poll=0.05)  # type: ignore[arg-type]
    directory = SiteDirectory(Empty())  # type: ignore[arg-type]
    directory.names = {5: "H1", 7: "H2"}  # as learnt from replies in earlier rounds
    with pytest.raises(RoundFailed, match=r"Not connected: H2 \(node 7\)\. Start the missing SuperNodes"):
        wait_for_sites(directory, minimum=2, timeout=0.2, poll=0.05)


def test_a_run_that_found_too_few_sites_leaves_its_folder_free_for_the_next(synth_root: Path, tmp_path: Path) -> None:
    """`flwr run .` with Flower's 2 default SuperNodes fails in round 1; the same command with 3 must then start
    in the same run folder, not be refused as if the failed attempt had been a run."""
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{"rounds.num-server-rounds": 1, "rounds.wait-for-sites": 0.2,
                                                      "data.sites-root": str(synth_root / "data")}))
    with pytest.raises(RoundFailed, match=r"only 2 site\(s\) connected.*--federation-config num-supernodes=3"):
        Federation(run).run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2))
    assert RunFolder(run).outputs() == []
    Federation(run)  # accepted: nothing of a run is there


def test_sampling_respects_fraction_and_minimum() -> None:
    import random

    nodes = list(range(10))
    assert len(sample(nodes, 0.3, 2, random.Random(0))) == 3
    assert len(sample(nodes, 0.05, 2, random.Random(0))) == 2
    assert sample(nodes[:1], 1.0, 2, random.Random(0)) == [0]


def test_fedprox_run_sends_mu_to_the_sites(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medfusion_fl import site

    seen: list[float] = []
    original = site.SiteRunner.train

    def spy(self: site.SiteRunner, weights: dict, *, server_round: int, proximal_mu: float, **kw):  # type: ignore[no-untyped-def]
        seen.append(proximal_mu)
        return original(self, weights, server_round=server_round, proximal_mu=proximal_mu, **kw)

    monkeypatch.setattr(site.SiteRunner, "train", spy)
    run = RunConfig.from_flat(tiny_flat(tmp_path, **{
        "rounds.num-server-rounds": 1, "data.sites-root": str(synth_root / "data"), **PLAIN,
        "strategy.name": "fedprox", "strategy.proximal-mu": 0.25, "rounds.fraction-evaluate": 0.0}))
    record = Federation(run).run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=2, node_config=OPEN_POLICY))
    assert seen == [0.25, 0.25] and record["strategy"] == "fedprox" and record["evaluate"] is None


def test_resume_continues_from_the_last_complete_round(synth_root: Path, tmp_path: Path) -> None:
    from medfusion_fl.errors import CheckpointError

    first = _run(synth_root, **{"rounds.num-server-rounds": 1, "output.run-dir": str(tmp_path / "run")})
    Federation(first).run_rounds(InProcessGrid(client_app, first.to_flat(), num_nodes=3, node_config=OPEN_POLICY))
    after_one = load_checkpoint(RunStore(tmp_path / "run").latest_checkpoint()).weights
    again = _run(synth_root, **{"rounds.num-server-rounds": 3, "output.run-dir": str(tmp_path / "run"),
                                "output.resume": True})
    grid = InProcessGrid(client_app, again.to_flat(), num_nodes=3, node_config=OPEN_POLICY)
    federation = Federation(again)
    assert all((a == b).all() for a, b in zip(federation.resume()[0].values(), after_one.values(), strict=True))
    federation = Federation(again)
    federation.run_rounds(grid)
    store = RunStore(tmp_path / "run")
    assert [line["round"] for line in store.read_metrics()] == [1, 2, 3]
    assert {m.content.config_records["config"]["server-round"] for m in grid.sent} == {2, 3}  # round 1 not redone
    assert load_checkpoint(store.latest_checkpoint()).round == 3
    other = _run(synth_root, **{"output.run-dir": str(tmp_path / "run"), "output.resume": True,
                                "model.fusion": "gated"})
    with pytest.raises(CheckpointError, match=r"another model \(model.fusion\) config"):
        Federation(other).resume()


def test_errors_written_by_the_superlink_are_attributed_to_the_lost_node() -> None:
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.sites import Exchange

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    sent = [Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                    message_type="train") for node in (41, 42, 43)]

    class Link:  # a SuperLink that answers for node 42 (missed heartbeats) and refuses the message to 43
        def push_messages(self, messages: list[Message]) -> list[str | None]:
            for msg in messages:  # as Flower's grids do; the third is refused
                msg.metadata.__dict__["_message_id"] = f"id-{msg.metadata.dst_node_id}"
            return ["id-41", "id-42", None]

        def pull_messages(self, ids: list[str]) -> list[Message]:
            lost = Message(error=Error(code=5, reason="Node Unavailable"), reply_to=sent[1])
            lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink is its source
            return [lost, lost]  # a repeated reply is ignored

    exchange = Exchange.push(Link(), sent, timeout=0.3)  # type: ignore[arg-type]
    assert [(node, reply.error.code) for node, reply in exchange.replies()] == [(42, 5)]
    assert exchange.unanswered == [41] and exchange.refused == [43]
