"""`medfusion-fl site review | approve | revoke | approvals`: the hospital's decision on which apps it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medfusion_fl.approval.approvals import ApprovalList, SiteApps
from medfusion_fl.approval.fab import FabInfo, build_app, parse_hash, read_fab, read_fab_file, source_diff
from medfusion_fl.errors import ConfigError


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _resolve(target: str, apps: SiteApps) -> tuple[FabInfo, bytes | None]:
    """A .fab file, an app folder (built as `flwr build` does) or a hash the site's app store holds."""
    path = Path(target)
    if path.is_dir():
        content = build_app(path)
        return read_fab(content, where=f"{path} (built)"), content
    if path.is_file():
        return read_fab_file(path), path.read_bytes()
    sha = parse_hash(target)
    info = apps.stored(sha)
    if info is None:
        raise ConfigError(f"{apps.site_id} has no app sha256:{sha[:12]}... in its app store {apps.store}: the site "
                          "keeps every FAB it is sent; ask the coordinator for the .fab file and review that")
    return info, None


def _entry_line(entry: dict[str, Any]) -> str:
    note = f"  note: {entry['note']}" if entry["note"] else ""
    return f"sha256:{entry['sha256']}  {entry['app']} {entry['version']}  {entry['action']}d {entry['time']} by " \
           f"{entry['by']}{note}"


def initial_weights(info: FabInfo) -> str:
    """What the app's run defaults start the model from (init.*): what this site would train on top of."""
    config = info.config
    keys = ("init.source", "init.path", "init.sha256", "init.part", "model.backbone", "model.norm")
    said = ", ".join(f"{k} = {config[k]!r}" for k in keys if k in config and config[k] != "")
    if "init.source" not in config:
        return "not stated in the app's pyproject (an app from before init.*): the model starts at random"
    return (f"{said} (the app's run defaults; a run may override them with --run-config: its model card records "
            "what it started from, with the SHA-256 of those weights)")


def cmd_review(args: argparse.Namespace) -> int:
    apps = SiteApps.of_site_file(args.config)
    info, _ = _resolve(args.fab, apps)
    approvals = ApprovalList(apps)
    status = "APPROVED" if approvals.is_approved(info.sha256) else "not approved"
    _out(f"app      {info.app_id} {info.version} (publisher {info.publisher})")
    _out(f"sha256   {info.sha256}")
    _out(f"size     {info.size} B, {len(info.files)} files, {len(info.sources)} Python sources")
    _out(f"status   {status} at {apps.site_id} ({apps.approvals})")
    _out(f"initial  {initial_weights(info)}")
    _out("files:")
    for path, size in info.files:
        _out(f"  {size:>9}  {path}")
    previous = approvals.previous_version(info)
    if previous is None:
        _out(f"no other version of {info.app_id} is approved at {apps.site_id}: review every Python source above")
        return 0
    old = apps.stored(previous["sha256"])
    if old is None:
        _out(f"the approved sha256:{previous['sha256'][:12]}... is not in the app store {apps.store}; no diff")
        return 0
    diff = source_diff(old, info)
    _out(f"Python sources against the approved {old.version} sha256:{old.sha256[:12]}... ({previous['time']}):")
    _out(diff if diff else "  (no change in any Python source)")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    apps = SiteApps.of_site_file(args.config)
    info, content = _resolve(args.fab, apps)
    approvals = ApprovalList(apps)
    if approvals.is_approved(info.sha256):
        _out(f"sha256:{info.sha256} ({info.app_id} {info.version}) is already approved at {apps.site_id}")
        return 0
    if content is not None:
        apps.keep(content)  # for the diff of the next version's review
    entry = approvals.approve(info, note=args.note or "")
    _out(f"approved {_entry_line(entry)}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    apps = SiteApps.of_site_file(args.config)
    entry = ApprovalList(apps).revoke(parse_hash(args.hash), note=args.note or "")
    _out(f"revoked {_entry_line(entry)}")
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    apps = SiteApps.of_site_file(args.config)
    approvals = ApprovalList(apps)
    current = approvals.current()
    _out(f"{apps.site_id}: {len(current)} app(s) approved; {len(approvals.entries)} entries in {apps.approvals}, "
         "hash chain intact")
    for entry in sorted(current.values(), key=lambda e: int(e["seq"])):
        _out(f"  {_entry_line(entry)}")
    return 0


def add_commands(site: Any) -> None:
    """Register the commands under `medfusion-fl site`."""

    def with_site(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=Path("site.toml"),
                       help="the site's site.toml (default: ./site.toml); the approval list lives beside it")
        return p

    p = with_site(site.add_parser("review", help="show an app (FAB) before approving it: identity, hash, files, "
                                                 "diff against the approved version"))
    p.add_argument("fab", help="a .fab file, an app folder, or the app's sha256 from a refusal")
    p.set_defaults(func=cmd_review)
    p = with_site(site.add_parser("approve", help="add an app's hash to the site's approval list"))
    p.add_argument("fab", help="a .fab file, an app folder, or the app's sha256 from a refusal")
    p.add_argument("--note", help="why (ticket, reviewer): kept in the list")
    p.set_defaults(func=cmd_approve)
    p = with_site(site.add_parser("revoke", help="withdraw an approval"))
    p.add_argument("hash", help="the app's sha256")
    p.add_argument("--note", help="why: kept in the list")
    p.set_defaults(func=cmd_revoke)
    p = with_site(site.add_parser("approvals", help="list the apps the site approved"))
    p.set_defaults(func=cmd_approvals)
