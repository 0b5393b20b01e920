"""Run/site config: pyproject defaults in sync, clear errors, TOML and Flower's flat form."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from medfusion_fl.config import RunConfig, all_keys, privacy_warnings
from medfusion_fl.config_sources import flatten, parse_overrides
from medfusion_fl.errors import ConfigError
from medfusion_fl.site_config import SiteConfig
from tests.conftest import REPO


def pyproject_config() -> dict[str, object]:
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    return flatten(doc["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_equal_pydantic_defaults() -> None:
    assert pyproject_config() == RunConfig().to_flat()
    assert sorted(pyproject_config()) == sorted(all_keys())


def test_defaults_are_the_private_setting() -> None:
    run = RunConfig()
    assert run.privacy.enabled and run.secagg.enabled and run.rounds.min_sites >= 3
    assert privacy_warnings(run) == []
    plain = RunConfig.from_flat({"privacy.enabled": False, "secagg.enabled": False})
    assert [w.split(":")[0] for w in privacy_warnings(plain)] == ["privacy.enabled = false", "secagg.enabled = false"]


def test_flat_round_trip() -> None:
    flat = {**RunConfig().to_flat(), "train.lr": 0.05, "strategy.name": "fedprox", "strategy.proximal-mu": 0.1}
    config = RunConfig.from_flat(flat)
    assert config.train.lr == 0.05 and config.strategy.proximal_mu == 0.1
    assert config.to_flat() == flat


def test_unknown_key_names_key_and_closest_match() -> None:
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*Did you mean 'train\.lr'"):
        RunConfig.from_flat({"train.lrr": 0.1})
    with pytest.raises(ConfigError, match="Unknown config key 'nosection.x'"):
        RunConfig.from_flat({"nosection.x": 1})


def test_bad_value_names_key_value_and_range() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({"train.lr": -1.0, "rounds.fraction-train": 2.0})
    text = str(info.value)
    assert "'train.lr' = -1.0" in text and "greater than 0" in text
    assert "'rounds.fraction-train' = 2.0" in text and "less than or equal to 1" in text
    assert "pyproject.toml" in text


def test_cross_field_and_list_checks() -> None:
    with pytest.raises(ConfigError, match="secagg.enabled = false"):
        RunConfig.from_flat({"strategy.name": "krum"})
    with pytest.raises(ConfigError, match="unique"):
        RunConfig.from_flat({"data.view-names": "a,a"})
    with pytest.raises(ConfigError, match="low must be below high"):
        RunConfig.from_flat({"data.tabular-columns": "age:10:1"})
    with pytest.raises(ConfigError, match="at least two"):
        RunConfig.from_flat({"data.classes": "only"})


def test_an_evaluation_schedule_and_target_that_cannot_work_are_refused() -> None:
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=rf"'evaluation.every' = {bad}.*never release.*rounds.num-server-rounds"):
            RunConfig.from_flat({"evaluation.every": bad})
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"'evaluation.target-sensitivity' = {bad}.*not a sensitivity in "
                                              r"\(0, 1\).*or 0 for Youden"):
            RunConfig.from_flat({"evaluation.target-sensitivity": bad})
    run = RunConfig.from_flat({"evaluation.every": 2, "evaluation.target-sensitivity": 0.9,
                               "rounds.num-server-rounds": 5})
    assert [r for r in range(1, 6) if run.evaluation.releases_at(r, 5)] == [2, 4, 5]
    assert [r for r in range(1, 4) if RunConfig.from_flat({"evaluation.every": 9}).evaluation.releases_at(r, 3)] == [3]


def test_column_spec_parsing() -> None:
    config = RunConfig.from_flat({"data.tabular-columns": "age:0:120, marker"})
    age, marker = config.data.columns
    assert (age.name, age.low, age.high) == ("age", 0.0, 120.0)
    assert (marker.name, marker.low, marker.high) == ("marker", None, None)
    crp, = RunConfig.from_flat({"data.tabular-columns": "crp:0.1:500:log"}).data.columns
    assert (crp.low, crp.high, crp.log) == (0.1, 500.0, True) and not age.log
    for bad, says in (("crp:0:500:log", r"data.tabular-columns.*'crp:0:500:log'.*log scale needs low > 0 \(got 0\)"),
                      ("crp:1:500:ln", r"'crp:1:500:ln' must be .*'name:low:high:log'"),
                      ("crp:5:1", "low must be below high"), ("crp:1:inf", "both finite")):
        with pytest.raises(ConfigError, match=says):
            RunConfig.from_flat({"data.tabular-columns": bad})


def test_secure_aggregation_settings_are_checked() -> None:
    assert RunConfig.from_flat({"secagg.enabled": True}).secagg.enabled
    with pytest.raises(ConfigError, match="must be even"):
        RunConfig.from_flat({"secagg.neighbours": 3})
    with pytest.raises(ConfigError, match="lower secagg.threshold"):
        RunConfig.from_flat({"secagg.neighbours": 2, "secagg.threshold": 4})
    with pytest.raises(ConfigError, match="Raise rounds.min-sites or lower secagg.threshold"):
        RunConfig.from_flat({"secagg.enabled": True, "secagg.threshold": 3, "rounds.min-sites": 2})


def test_from_toml_plain_tables_and_pyproject(tmp_path: Path) -> None:
    plain = tmp_path / "run.toml"
    plain.write_text('[train]\nlr = 0.01\n[model]\nbackbone = "resnet18"\n')
    config = RunConfig.from_toml(plain, overrides={"train.local-epochs": 4})
    assert (config.train.lr, config.model.backbone, config.train.local_epochs) == (0.01, "resnet18", 4)
    assert RunConfig.from_toml(REPO / "pyproject.toml") == RunConfig()
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(tmp_path / "bad.toml")


def test_overrides_parse_toml_values() -> None:
    assert parse_overrides(["train.lr=0.1", "privacy.enabled=false", 'model.backbone="resnet18"',
                            "model.backbone2=resnet18"]) == {
        "train.lr": 0.1, "privacy.enabled": False, "model.backbone": "resnet18", "model.backbone2": "resnet18"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_site_config_in_simulation_and_deployment(tmp_path: Path) -> None:
    run = RunConfig.from_flat({"data.sites-root": "/data/sites", "output.run-dir": "/runs/x"})
    sim = SiteConfig.from_node_config({"partition-id": 2, "num-partitions": 3}, run)
    assert (sim.site_id, sim.data_path) == ("site-2", Path("/data/sites/site-2"))
    assert sim.state_dir == Path("/runs/x/site-state/site-2")
    real = SiteConfig.from_node_config({"data-path": str(tmp_path), "site-id": "H1", "device": "cpu"}, run)
    assert (real.site_id, real.data_path, real.device) == ("H1", tmp_path, "cpu")
    with pytest.raises(ConfigError, match="'data-pth'.*--node-config"):
        SiteConfig.from_node_config({"data-pth": "/x"}, run)
    with pytest.raises(ConfigError, match="no 'data-path'"):
        SiteConfig.from_node_config({}, run)
    with pytest.raises(ConfigError, match="'device' = 'tpu'"):
        SiteConfig.from_node_config({"data-path": "/x", "device": "tpu"}, run)
    with pytest.raises(ConfigError, match=r"(?s)site configuration.*'policy.min-sites' = 1.*site.toml \[policy\]"):
        SiteConfig.from_node_config({"data-path": "/x", "min-sites": 1}, run)


def test_simulated_sites_read_their_own_policy_file(tmp_path: Path) -> None:
    run = RunConfig.from_flat({"data.sites-root": str(tmp_path), "output.run-dir": str(tmp_path / "run")})
    assert SiteConfig.from_node_config({"partition-id": 1}, run).policy.min_sites == 3  # no file: the defaults
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "site-1.toml").write_text("[policy]\nmin-sites = 2\nshare-metrics = true\n")
    site = SiteConfig.from_node_config({"partition-id": 1}, run)
    assert (site.policy.min_sites, site.policy.share_metrics, site.policy.require_dp) == (2, True, True)
    assert SiteConfig.from_node_config({"partition-id": 0}, run).policy.min_sites == 3  # another site's file
    (tmp_path / "policies" / "site-1.toml").write_text("[policy]\nmin-site = 2\n")
    with pytest.raises(ConfigError, match=r"site-1.toml: unknown \[policy\] key\(s\) \['min-site'\]"):
        SiteConfig.from_node_config({"partition-id": 1}, run)


def test_config_show_prints_the_effective_config(capsys: pytest.CaptureFixture[str],
                                                 package_log: pytest.LogCaptureFixture) -> None:
    from medfusion_fl.cli import main

    args = ["config", "show", "--app", str(REPO), "--preset", "tiny-3d-cpu", "--set", "secagg.enabled=false"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(all_keys())
    assert "model.backbone = 'resnet3d-10'  # default 'resnet10t'" in lines  # from the preset
    assert "secagg.enabled = False  # default True" in lines and "privacy.enabled = True" in lines
    assert "secagg.enabled = false: no secure aggregation" in package_log.text


def test_a_config_file_overrides_the_preset_and_set_overrides_both(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from medfusion_fl.cli import main

    (tmp_path / "run.toml").write_text('[train]\nlr = 0.05\nclass-weights = ""\n[rounds]\nnum-server-rounds = 7\n')
    args = ["config", "show", "--app", str(REPO), "--preset", "tiny-cpu", "--config", str(tmp_path / "run.toml"),
            "--set", "rounds.num-server-rounds=9"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.lr = 0.05  # default 0.002" in lines  # the preset's 0.001 gives way to the file
    assert "train.class-weights = ''" in lines and "rounds.num-server-rounds = 9  # default 3" in lines


def test_simulation_keys_override_the_preset_and_are_checked() -> None:
    import argparse

    from medfusion_fl.cli import _preset_config

    def table(*sets: str) -> dict[str, object]:
        args = argparse.Namespace(app=str(REPO), preset="tiny-cpu", config=None, set=list(sets))
        return _preset_config(args)[1]

    assert table()["num-sites"] == 3
    chosen = table("simulation.num-sites=100", "simulation.cpus-per-site=0.5", "train.lr=0.01")
    assert chosen["num-sites"] == 100 and chosen["cpus-per-site"] == 0.5
    with pytest.raises(ConfigError, match=r"simulation.num-site: not a simulation key; known: simulation.num-sites"):
        table("simulation.num-site=4")
    with pytest.raises(ConfigError, match=r"simulation.num-sites = 2.5: must be an integer >= 1"):
        table("simulation.num-sites=2.5")
    with pytest.raises(ConfigError, match=r"simulation.cpus-per-site = 0: must be a number >= 0.01"):
        table("simulation.cpus-per-site=0")


def _default_epsilon(tmp_path: Path, **overrides: object) -> dict[str, float]:
    """Each default synthetic site's epsilon after every round of a run config with `overrides`: training
    and evaluation releases together, as its guard plans and its ledger composes them."""
    from medfusion_fl.data import load_site, write_federation
    from medfusion_fl.policy.site_policy import SitePolicy
    from medfusion_fl.privacy.accountant import epsilon
    from medfusion_fl.privacy.guard import planned_evaluation, planned_step

    run = RunConfig.from_flat({"data.sites-root": str(tmp_path), **overrides})
    policy = SitePolicy()
    spent = {}
    for folder in write_federation(tmp_path, run, 3)[:-1]:
        train = len(load_site(folder, run.data).train)
        history = [planned_step(train, run.train, run.privacy), planned_evaluation(run.evaluation)]
        spent[folder.name] = epsilon(history * run.rounds.num_server_rounds, delta=policy.delta)
    return spent


def test_the_defaults_fit_the_default_site_budget_for_the_default_rounds(tmp_path: Path) -> None:
    """pyproject's defaults (what `flwr run .` runs) finish every round at every default synthetic site:
    a default site never has to decline a round of a default run."""
    from medfusion_fl.policy.site_policy import SitePolicy

    budget = SitePolicy().max_epsilon
    spent = _default_epsilon(tmp_path / "defaults")
    assert all(eps <= budget for eps in spent.values()), spent
    assert max(spent.values()) > 0.8 * budget  # the budget is used, not left idle
    # control: the old defaults (2 local epochs) overran it before round 3
    assert any(eps > budget for eps in _default_epsilon(tmp_path / "two", **{"train.local-epochs": 2}).values())


def test_simulate_help_names_the_default_preset_and_lists_them(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from medfusion_fl.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: tiny-cpu)" in text
    assert "tiny-cpu: 3 synthetic hospitals" in text and "tiny-3d-cpu: 3 synthetic hospitals of CT-like" in text


def test_config_show_without_a_preset_is_what_simulate_runs_without_one(tmp_path: Path) -> None:
    """`config show` (no preset) prints the defaults; `simulate` (no preset) runs tiny-cpu: the same config but for
    the demo's fine-tuning of its pretrained start: class weights (a consortium's expected prevalence, which no
    default can know), a frozen backbone and half the learning rate."""
    import argparse

    from medfusion_fl.cli import _preset_config

    args = argparse.Namespace(app=str(REPO), preset="tiny-cpu", config=None, set=[])
    simulated = _preset_config(args)[0].to_flat()
    assert {k: simulated[k] for k, v in RunConfig().to_flat().items() if simulated[k] != v} == {
        "train.class-weights": "0.5,1", "train.freeze": "image.backbones", "train.lr": 0.001}
