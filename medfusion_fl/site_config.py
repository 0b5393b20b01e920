"""What a hospital decides for itself (SiteConfig): its name, data, state, device, federation and policy.

Real SuperNodes get it as node-config keys (`--node-config 'data-path="..." site-id="H1" min-sites=3'`,
written by `medfusion-fl site run` from site.toml). Simulated ones get only `partition-id`: they read
`<data.sites-root>/site-<k>` and their policy from `<data.sites-root>/policies/site-<k>.toml` when it exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from medfusion_fl.config import RunConfig, explain_invalid, unknown_key
from medfusion_fl.config_base import WHERE, Section
from medfusion_fl.config_sources import read_toml
from medfusion_fl.errors import ConfigError
from medfusion_fl.policy.site_policy import POLICY_KEYS, SitePolicy

_SITE_KEYS = ("site-id", "data-path", "state-dir", "ledger-head", "device", "gpus", "federation")
_SIMULATION_KEYS = ("partition-id", "num-partitions")
POLICY_FOLDER = "policies"


class SiteConfig(Section):
    """One site's own settings; the coordinator's run config never changes them."""

    site_id: str = Field(description="Name of the site in logs and metrics.")
    data_path: Path = Field(description="The site folder (manifest.csv + images).")
    state_dir: Path = Field(description="Where the site keeps its own state (privacy ledger, outbound audit log).")
    ledger_head: Path | None = Field(None, description="The head of the site's hash-chained privacy ledger, kept "
                                     "outside state-dir so that folder alone cannot rewrite the ledger; default "
                                     "<state-dir>.ledger-head, beside it.")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Torch device for local training.")
    gpus: int = Field(1, ge=1, le=64, description="Processes that train the site's local epochs, one per GPU "
                      "(cuda:0..N-1, NCCL): the same exact per-patient DP-SGD step, its patients split across "
                      "them and its noise drawn once; needs device 'cuda' or 'auto' with N GPUs, and DP training.")
    federation: str = Field("default", min_length=1, description="Name under which the site's privacy ledger "
                            "accumulates DP steps; the budget holds over all runs of this federation.")
    policy: SitePolicy = Field(SitePolicy(), description="The least protection the site accepts (site policy).")

    def ledger_head_path(self) -> Path:
        return self.ledger_head or default_ledger_head(self.state_dir)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
        """Real SuperNodes pass data-path etc.; simulated ones only partition-id."""
        known = (*_SITE_KEYS, *POLICY_KEYS, *_SIMULATION_KEYS)
        for key, value in node_config.items():
            if key not in known:
                raise ConfigError(unknown_key(key, sorted(known), value).replace(WHERE, "--node-config"))
        values = {k: v for k, v in node_config.items() if k in _SITE_KEYS}
        policy = {k: v for k, v in node_config.items() if k in POLICY_KEYS}
        if "data-path" not in values:
            if "partition-id" not in node_config:
                raise ConfigError("node_config has no 'data-path': start the SuperNode with "
                                  "--node-config 'data-path=\"/path/to/site\"'.")
            site = f"site-{partition_id(node_config)}"
            values["data-path"] = str(Path(run.data.sites_root) / site)
            values.setdefault("site-id", site)
            policy = {**read_policy_file(simulated_policy_path(run, str(values["site-id"]))), **policy}
        values.setdefault("site-id", Path(str(values["data-path"])).name)
        values.setdefault("state-dir", str(Path(run.output.run_dir) / "site-state" / str(values["site-id"])))
        try:
            return cls.model_validate({**values, "policy": policy})
        except ValidationError as exc:
            flat = {**values, **{f"policy.{k}": v for k, v in policy.items()}}
            where = "--node-config or site.toml [policy]"
            text = explain_invalid(exc, flat).replace(WHERE, where).replace("run configuration", "site configuration")
            raise ConfigError(text) from None


def partition_id(node_config: Mapping[str, Any]) -> int | None:
    """A simulated node's partition-id (None for a real SuperNode); anything but an integer >= 0 is refused."""
    value = node_config.get("partition-id")
    if value is None:
        return None
    text = str(value)
    if isinstance(value, bool) or not isinstance(value, int | str) or not (text.isascii() and text.isdigit()):
        raise ConfigError(f"node config partition-id = {value!r} must be an integer >= 0 (Flower sets it in "
                          "simulation; a real SuperNode passes data-path instead).")
    return int(value)


def default_ledger_head(state_dir: Path) -> Path:
    """Where a site keeps its privacy ledger's head unless it says otherwise: beside its state folder."""
    state_dir = Path(state_dir).absolute()
    return state_dir.with_name(state_dir.name + ".ledger-head")


def simulated_policy_path(run: RunConfig, site_id: str) -> Path:
    """Where a simulated site finds its own policy (the simulation's stand-in for site.toml)."""
    return Path(run.data.sites_root) / POLICY_FOLDER / f"{site_id}.toml"


def read_policy_file(path: Path) -> dict[str, Any]:
    """The [policy] table of a site.toml-like file ({} when the file does not exist); unknown keys refused."""
    if not path.is_file():
        return {}
    doc = read_toml(path, "site policy file")
    table = doc.get("policy", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [policy] must be a table of keys {list(POLICY_KEYS)}")
    bad = sorted(set(table) - set(POLICY_KEYS))
    if bad:
        raise ConfigError(f"{path}: unknown [policy] key(s) {bad}; valid: {list(POLICY_KEYS)}")
    return dict(table)
