"""The app check of a simulated site: the stand-in for what a deployed site's own runner does.

A deployed site checks the FAB before importing it (medfusion_fl.approval.clientapp), so no app can skip
that check. A simulated site runs the local folder's code; when its policy file sets
require-approved-app = true, this mod checks the hash of the FAB Flower would build from that folder
against the site's approval list (`<sites-root>/policies/<site>.approvals.jsonl`) and answers every
message with the refusal (code 4003) until the app is approved there.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from client.replies import site_config_of
from medfusion_fl.approval.approvals import SiteApps, check_app, refusal_reason
from medfusion_fl.approval.fab import build_app
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import AppNotApproved, ApprovalListDamaged
from medfusion_fl.protocol import APP_NOT_APPROVED
from medfusion_fl.site_config import simulated_policy_path

APP_DIR = Path(__file__).resolve().parents[1]


@functools.cache
def app_hash(folder: Path = APP_DIR) -> str:
    """The SHA-256 of the FAB of this app's folder (what `flwr run` would ship)."""
    return hashlib.sha256(build_app(folder)).hexdigest()


def approval_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    site = site_config_of(context)
    if site is None or "partition-id" not in context.node_config or site.policy.require_approved_app is not True:
        return call_next(msg, context)  # deployed sites check before this code is even imported
    apps = SiteApps.of_site_file(simulated_policy_path(RunConfig.from_flat(context.run_config), site.site_id))
    try:
        check_app(apps, app_hash())
    except (AppNotApproved, ApprovalListDamaged) as exc:
        return Message(error=Error(code=APP_NOT_APPROVED, reason=refusal_reason(exc, site.site_id)), reply_to=msg)
    return call_next(msg, context)
