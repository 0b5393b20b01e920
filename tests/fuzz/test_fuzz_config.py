"""Fuzz configuration as people type it: `--set KEY=VALUE` strings, TOML files, a site's node config.

The property: a valid config or a ConfigError that names the key (and the value), never another exception;
whatever is accepted keeps the run's invariants (finite numbers, noise under DP)."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from medfusion_fl.config import RunConfig, all_keys
from medfusion_fl.config_sources import parse_overrides, read_toml_flat
from medfusion_fl.errors import ConfigError
from medfusion_fl.site_config import SiteConfig

KEYS = all_keys()
VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1e400", "nan", "inf", "-inf", "true", "\"\"", "\"a,b,a\"", "[1, 2]", "{x = 1}",
                     "0.0", "3", "\"fedyogi\"", "\"x:1:0\"", "1_000", "0x10", "'single'", "\"\\u0000\"", "="]),
    st.text(max_size=15),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
)
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k.replace("-", "_")), st.text(max_size=12))
DEFAULTS = RunConfig().to_flat()


def _plausible(key: str) -> st.SearchStrategy[str]:
    """A value of the key's own type near its default, as a person would set it: mostly valid."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        return st.sampled_from(["true", "false"])
    if isinstance(default, int):
        return st.integers(max(default - 1, 0), default + 2).map(str)
    if isinstance(default, float):
        return st.sampled_from([default, default * 0.5, default * 2, default + 0.1]).map(repr)
    return st.just(f'"{default}"')


PLAUSIBLE = st.sampled_from(KEYS).flatmap(lambda k: _plausible(k).map(lambda v: f"{k}={v}"))
ANY_ITEM = st.tuples(KEY, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=20)
# half the examples as a person sets keys (most of them valid), half anything at all
OVERRIDES = st.lists(PLAUSIBLE, max_size=4) | st.lists(ANY_ITEM, max_size=5)


def _names_what_was_wrong(message: str, items: list[str]) -> None:
    """A refusal names a key the user typed (or the item it could not read), with the valid keys' home."""
    typed = [item.partition("=")[0].strip() for item in items]
    named = [key for key in typed if key and (key in message or repr(key) in message)]
    named += [item for item in items if repr(item) in message]  # an item it could not read, as typed
    assert named, (message, items)
    assert "--set" in message or "KEY=VALUE" in message or "pyproject.toml" in message, message


def _accepted_is_sane(run: RunConfig) -> None:
    for section in run.model_dump().values():
        for value in section.values():
            assert not isinstance(value, float) or math.isfinite(value)
    if run.privacy.enabled:
        assert run.privacy.noise_multiplier > 0 and run.evaluation.noise_multiplier > 0


@given(items=OVERRIDES)
def test_any_set_overrides_give_a_config_or_a_config_error(items: list[str]) -> None:
    try:
        run = RunConfig.from_flat(parse_overrides(items))
    except ConfigError as exc:
        _names_what_was_wrong(str(exc), items)
        return
    _accepted_is_sane(run)


def test_the_override_fuzzing_reaches_valid_configs_about_as_often_as_invalid_ones() -> None:
    accepted: list[bool] = []

    @settings(max_examples=300, derandomize=True, database=None)
    @given(items=OVERRIDES)
    def draw(items: list[str]) -> None:
        try:
            RunConfig.from_flat(parse_overrides(items))
            accepted.append(True)
        except ConfigError:
            accepted.append(False)

    draw()
    assert 0.3 <= sum(accepted) / len(accepted) <= 0.7, sum(accepted) / len(accepted)


@given(lines=st.lists(st.tuples(KEY, VALUES).map(lambda kv: f"\"{kv[0]}\" = {kv[1]}") | st.text(max_size=25),
                      max_size=5), table=st.sampled_from(["", "[tool.flwr.app.config]\n", "[train]\n"]))
def test_any_toml_file_gives_a_config_or_a_config_error(tmp_path: Path, lines: list[str], table: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(table + "\n".join(lines) + "\n", encoding="utf-8")
    try:
        run = RunConfig.from_flat(read_toml_flat(path))
    except ConfigError as exc:
        assert str(path) in str(exc) or "config key" in str(exc).lower() or "override" in str(exc).lower()
        return
    _accepted_is_sane(run)


NODE_KEYS = ["site-id", "data-path", "state-dir", "ledger-head", "device", "gpus", "federation", "partition-id",
             "max-epsilon", "delta", "min-sites", "require-dp", "require-secure-aggregation", "share-metrics",
             "min-noise-multiplier", "require-approved-app", "unknown-key"]
NODE_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True),
                        st.text(max_size=10), st.sampled_from(["cuda:7", "cpu", "/tmp", "", "../x"]))


@given(node=st.dictionaries(st.sampled_from(NODE_KEYS), NODE_VALUES, max_size=6))
def test_any_node_config_gives_a_site_or_a_config_error(node: dict[str, object]) -> None:
    try:
        site = SiteConfig.from_node_config({k: v for k, v in node.items() if v is not None}, RunConfig())
    except ConfigError as exc:  # names a key it was given, or the one it lacks
        given_keys = [k for k, v in node.items() if v is not None]
        assert any(f"'{k}'" in str(exc) or f"'policy.{k}'" in str(exc) for k in given_keys) or \
            "no 'data-path'" in str(exc) or "partition-id" in str(exc), (str(exc), node)
        return
    policy = site.policy
    assert isinstance(site.gpus, int) and 1 <= site.gpus <= 64
    assert math.isfinite(policy.max_epsilon) and policy.max_epsilon > 0 and 0 < policy.delta < 1
