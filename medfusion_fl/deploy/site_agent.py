"""`medfusion-fl site run --config site.toml`: check a hospital's config, data, privacy ledger and app
approval list, then start its Flower SuperNode (never when a check fails) in process isolation and serve
its ClientApp tasks with the site's own code (medfusion_fl.approval.superexec), which runs only approved apps.

site.toml (paths relative to the file):

    [site]                     # the SuperNode's node-config: what the hospital decides (SiteConfig)
    site-id = "H1"
    data-path = "data/h1"
    state-dir = "state/h1"
    federation = "chest-xray"
    # gpus = 4                 # train each round's DP step on 4 GPUs of this server (default 1)

    [policy]                   # the least protection the hospital accepts (SitePolicy; these are the defaults)
    require-secure-aggregation = true
    require-dp = true
    max-epsilon = 8.0
    delta = 1e-5
    min-noise-multiplier = 0.5
    min-sites = 3
    share-metrics = false
    # require-approved-app = false  # unset: run only apps on <stem>.approvals.jsonl (medfusion-fl site approve)

    [superlink]                # where and how to connect
    address = "coord.example.org:9092"
    root-certificates = "certs/ca.pem"
    auth-key = "certs/sites/H1/auth_key"
    runtime-port = 9094        # this SuperNode's local Runtime API port (distinct per SuperNode on a host)

    [run]                      # the federation's data schema, to check the folder before joining
    config = "pyproject.toml"  # the app's pyproject.toml or a run-config TOML
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfusion_fl.config import RunConfig
from medfusion_fl.config_sources import read_toml, read_toml_flat
from medfusion_fl.errors import ConfigError, DataError
from medfusion_fl.policy import POLICY_KEYS
from medfusion_fl.site_config import SiteConfig

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
_SUPERLINK_KEYS = {"address", "root-certificates", "auth-key", "runtime-port", "insecure"}


@dataclass(frozen=True)
class SiteAgent:
    site: SiteConfig
    run: RunConfig
    node_config: dict[str, Any]
    superlink: dict[str, Any]
    source: Path

    def command(self) -> list[str]:
        """The flower-supernode command line for this site."""
        exe = shutil.which("flower-supernode") or "flower-supernode"
        cmd = [exe, "--superlink", str(self.superlink["address"]),
               "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in self.node_config.items()),
               "--port", str(self.runtime_port), "--isolation", "process"]
        if self.superlink.get("insecure"):
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.superlink["root-certificates"])]
        if "auth-key" in self.superlink:
            cmd += ["--auth-supernode-private-key", str(self.superlink["auth-key"])]
        return cmd

    @property
    def runtime_port(self) -> int:
        return int(self.superlink.get("runtime-port", 9094))

    def check_state(self) -> None:
        """The privacy ledger and the approval list must pass their hash chains, and the site must have the
        GPUs its [site] gpus names, before the site joins."""
        from medfusion_fl.approval.approvals import ApprovalList, SiteApps
        from medfusion_fl.multigpu.launch import training_devices
        from medfusion_fl.privacy.ledger import PrivacyLedger
        from medfusion_fl.training import resolve_device

        training_devices(self.site.gpus, resolve_device(self.site.device))

        PrivacyLedger(self.site.state_dir, head=self.site.ledger_head_path())
        ApprovalList(SiteApps.of_site_file(self.source))

    def check(self) -> int:
        """Validate the site folder against the run's schema; raises DataError naming every problem."""
        from medfusion_fl.data import check_site

        records, problems = check_site(self.site.data_path, self.run.data)
        if problems:
            shown = "\n  ".join(str(p) for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{self.source}: site {self.site.site_id!r} is not ready, {self.site.data_path} has "
                            f"{len(problems)} problem(s); the SuperNode was not started:\n  {shown}{more}")
        return len(records)

    def start(self) -> int:
        """Run the SuperNode and serve its tasks until it exits; returns its exit code."""
        from medfusion_fl.approval.superexec import supervise

        self.site.state_dir.mkdir(parents=True, exist_ok=True)
        return supervise(self.command(), runtime_port=self.runtime_port, site_file=self.source.resolve(),
                         env={**os.environ, **FLOWER_ENV})


def _toml_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _resolve(base: Path, value: Any, what: str, *, must_exist: bool) -> str:
    path = (base / str(value)).resolve()
    if must_exist and not path.exists():
        raise ConfigError(f"{what} = {value!r}: {path} does not exist; fix the path in the site config")
    return str(path)


def load_agent(path: Path, overrides: dict[str, Any] | None = None) -> SiteAgent:
    """Parse and check site.toml (every path resolved against its folder)."""
    path = Path(path)
    doc = read_toml(path, "site config")
    unknown = set(doc) - {"site", "superlink", "run", "policy"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; expected [site], [policy], [superlink], [run]")
    base = path.parent
    site_table, link = dict(doc.get("site", {})), dict(doc.get("superlink", {}))
    moved = sorted(set(site_table) & set(POLICY_KEYS))
    if moved:
        raise ConfigError(f"{path}: {moved} belong to the [policy] table (the site's privacy policy), not [site]; "
                          "move them there")
    policy_table = dict(doc.get("policy", {}))
    bad_policy = sorted(set(policy_table) - set(POLICY_KEYS))
    if bad_policy:
        raise ConfigError(f"{path}: unknown [policy] key(s) {bad_policy}; valid: {list(POLICY_KEYS)}")
    bad = set(link) - _SUPERLINK_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown [superlink] key(s) {sorted(bad)}; valid: {sorted(_SUPERLINK_KEYS)}")
    if "address" not in link:
        raise ConfigError(f"{path}: [superlink] needs address = \"host:port\" of the coordinator")
    if not link.get("insecure"):
        if "root-certificates" not in link:
            raise ConfigError(f"{path}: [superlink] needs root-certificates (the federation CA, ca.pem)")
        link["root-certificates"] = _resolve(base, link["root-certificates"], "[superlink] root-certificates",
                                             must_exist=True)
    if "auth-key" in link:
        link["auth-key"] = _resolve(base, link["auth-key"], "[superlink] auth-key", must_exist=True)
    for key in ("data-path", "state-dir", "ledger-head"):
        if key in site_table:
            site_table[key] = _resolve(base, site_table[key], f"[site] {key}", must_exist=key == "data-path")
    run_table = dict(doc.get("run", {}))
    flat = read_toml_flat(Path(_resolve(base, run_table["config"], "[run] config", must_exist=True))) \
        if "config" in run_table else {}
    run = RunConfig.from_flat({**flat, **(overrides or {})})
    node_config = {**site_table, **policy_table}  # the policy travels as the SuperNode's own node-config keys
    site = SiteConfig.from_node_config(node_config, run)
    return SiteAgent(site, run, node_config, link, path)


def describe(agent: SiteAgent) -> str:
    return shlex.join(agent.command())
