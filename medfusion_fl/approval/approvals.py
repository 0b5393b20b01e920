"""A site's app approval list: which FAB hashes its hospital reviewed and approved (or revoked), and when.

The list lives beside site.toml (`<stem>.approvals.jsonl`), hash-chained (medfusion_fl.hashchain); its head
and the site's app store (every FAB the site received or reviewed, `<sha256>.fab`, never unpacked) live in
the site's state-dir, named by site.toml's [site] state-dir. A file without a [site] state-dir (a simulated
site's policy file) keeps them beside itself. An app is approved when the last entry for its hash is an
approval.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfusion_fl.approval.fab import FabInfo, read_fab
from medfusion_fl.config_sources import read_toml
from medfusion_fl.durable import write_bytes_atomic
from medfusion_fl.errors import AppNotApproved, ApprovalListDamaged, ConfigError
from medfusion_fl.hashchain import ChainedLog

_FIELDS = ("action", "sha256", "app", "version", "note", "by")


@dataclass(frozen=True)
class SiteApps:
    """Where one site keeps its approval list, the list's head and its app store."""

    site_id: str
    approvals: Path
    head: Path
    store: Path
    source: Path  # the site.toml (or simulated policy file) they derive from

    @classmethod
    def of_site_file(cls, path: Path) -> SiteApps:
        path = Path(path)
        site = read_toml(path, "site config (--config)").get("site", {})
        base = path.parent.resolve()
        site_id = str(site.get("site-id", path.stem))
        state = site.get("state-dir")
        if state is not None:
            folder = (base / str(state)).resolve()
            head, store = folder / "approvals.head", folder / "apps"
        else:
            head, store = base / f"{path.stem}.approvals.head", base / f"{path.stem}.apps"
        return cls(site_id, base / f"{path.stem}.approvals.jsonl", head, store, path)

    def keep(self, content: bytes) -> Path:
        """Keep a FAB's bytes in the app store (for review and later diffs); its hash names it."""
        info = read_fab(content, where="received FAB")
        target = self.store / f"{info.sha256}.fab"
        if not target.exists():
            write_bytes_atomic(target, content, mode=0o600)
        return target

    def stored(self, sha256: str) -> FabInfo | None:
        target = self.store / f"{sha256}.fab"
        return read_fab(target.read_bytes(), where=str(target)) if target.is_file() else None


class ApprovalList:
    """The chained list of approve / revoke entries of one site."""

    def __init__(self, apps: SiteApps) -> None:
        self.apps = apps
        self.chain = ChainedLog(apps.approvals, apps.head, fields=_FIELDS)
        check = self.chain.check()
        if not check.ok:
            where = f"line {check.broken_line}: " if check.broken_line else ""
            raise ApprovalListDamaged(
                f"app approval list {apps.approvals} failed its integrity check ({where}{check.problem}). No app "
                f"is run at {apps.site_id} until it is restored: put back {apps.approvals.name} and {apps.head} "
                "from the same backup, or move both away and approve the apps again after review.")
        self.entries: list[dict[str, Any]] = check.entries

    def current(self) -> dict[str, dict[str, Any]]:
        """sha256 -> the entry of every app approved now (its latest approval)."""
        state: dict[str, dict[str, Any]] = {}
        for entry in self.entries:
            if entry["action"] == "approve":
                state[entry["sha256"]] = entry
            else:
                state.pop(entry["sha256"], None)
        return state

    def is_approved(self, sha256: str) -> bool:
        return sha256 in self.current()

    def approve(self, info: FabInfo, *, note: str = "") -> dict[str, Any]:
        return self._add("approve", info.sha256, info.app_id, info.version, note)

    def revoke(self, sha256: str, *, note: str = "") -> dict[str, Any]:
        entry = self.current().get(sha256)
        if entry is None:
            raise ConfigError(f"sha256:{sha256[:12]}... is not approved at {self.apps.site_id}; nothing to revoke "
                              "(medfusion-fl site approvals lists what is)")
        return self._add("revoke", sha256, entry["app"], entry["version"], note)

    def previous_version(self, info: FabInfo) -> dict[str, Any] | None:
        """The latest approved entry of the same app under another hash (what a review diffs against)."""
        same = [e for e in self.current().values() if e["app"] == info.app_id and e["sha256"] != info.sha256]
        return max(same, key=lambda e: int(e["seq"])) if same else None

    def _add(self, action: str, sha256: str, app: str, version: str, note: str) -> dict[str, Any]:
        entry = self.chain.append({"action": action, "sha256": sha256, "app": app, "version": version,
                                   "note": note, "by": getpass.getuser()})
        self.entries.append(entry)
        return entry


def check_app(apps: SiteApps, sha256: str) -> None:
    """Raise AppNotApproved (the reason the coordinator reads) unless the site approved this hash."""
    if not ApprovalList(apps).is_approved(sha256):
        raise AppNotApproved(f"app sha256:{sha256[:12]}... is not approved at site {apps.site_id} "
                             "(medfusion-fl site review / approve)")


def refusal_reason(exc: AppNotApproved | ApprovalListDamaged, site_id: str) -> str:
    """What the coordinator reads of a refusal: the hash for an unapproved app; for a damaged list only that
    (its paths and the broken line stay in the site's log)."""
    if isinstance(exc, AppNotApproved):
        return str(exc)
    return f"site {site_id}: its app approval list failed its integrity check; it runs no app until the site " \
           "restores it"
