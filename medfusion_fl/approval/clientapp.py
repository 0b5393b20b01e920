"""The ClientApp process of a deployed site: Flower's `flwr-clientapp` with the site's own check first.

`medfusion-fl site run` starts the SuperNode with `--isolation process` and launches this module (the
site's installed code, never the coordinator's) once per message, in place of flwr-clientapp. It pulls the
message, context and FAB from the SuperNode's local Runtime API and, before the FAB is installed or
imported, hashes its bytes, keeps them in the site's app store (never unpacked) and checks the hash
against the site's approval list. An app that is not approved is answered with an error (code 4003)
naming its hash; an approved one is installed and run as flwr-clientapp runs it. Errors outside the app
are answered without their details, which stay in the site's log; every reply sent from here is recorded
in the site's outbound audit like the app's own replies.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from medfusion_fl.approval.approvals import SiteApps, check_app, refusal_reason
from medfusion_fl.console import ensure_logging
from medfusion_fl.deploy.site_agent import load_agent
from medfusion_fl.errors import AppNotApproved, ApprovalListDamaged, ConfigError, MedFusionError
from medfusion_fl.protocol import APP_NOT_APPROVED, SITE_ERROR
from medfusion_fl.release.audit import OutboundAudit, error_items
from medfusion_fl.site_config import SiteConfig

log = logging.getLogger("medfusion_fl.site")


def admit(site: SiteConfig, apps: SiteApps, fab: Fab) -> str:
    """The FAB's SHA-256 if this site may run it; AppNotApproved / ApprovalListDamaged otherwise."""
    sha = hashlib.sha256(fab.content).hexdigest()
    if fab.hash_str and fab.hash_str != sha:
        raise AppNotApproved(f"the app's bytes hash to sha256:{sha[:12]}..., not to the announced "
                             f"sha256:{fab.hash_str[:12]}...; site {site.site_id} refuses it")
    if site.policy.require_approved_app is False:
        log.warning("%s: app sha256:%s... runs unreviewed (site policy require-approved-app = false)",
                    site.site_id, sha[:12])
        return sha
    try:
        kept = apps.keep(fab.content)
    except ConfigError as exc:
        raise AppNotApproved(f"app sha256:{sha[:12]}... is not a valid FAB; site {site.site_id} refuses it "
                             f"({exc})") from None
    try:
        check_app(apps, sha)
    except AppNotApproved:
        log.error("%s: app sha256:%s is not approved; it was kept, unopened, as %s. Review it with `medfusion-fl "
                  "site review %s --config %s`, then approve or leave it.", site.site_id, sha, kept, sha, apps.source)
        raise
    return sha


def _reply_error(message: Message, context: Context, site: SiteConfig | None, code: int, reason: str) -> Message:
    reply = Message(Error(code=code, reason=reason), reply_to=message)
    if site is not None:
        OutboundAudit(site.state_dir).append(run=int(message.metadata.run_id), server_round=None,
                                             stage=message.metadata.message_type, kind="error",
                                             items=error_items(reason))
    return reply


def run_task(*, runtime_api_address: str, token: str, site_file: Path, parent_pid: int | None = None) -> int:
    """Serve one task of the SuperNode: pull, check, run (if approved), push. Returns the exit code."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details, code = SubStatus.FAILED, "the site's ClientApp process failed", 1
    try:
        message, context, run, fab = pull_task_input(client)
        try:
            site = load_agent(site_file).site
        except MedFusionError as exc:
            log.error("%s", exc)
            reason = "site error: its own configuration does not load; the details stay in the site's log"
            push_message(client, _reply_error(message, context, None, SITE_ERROR, reason), context)
            status, details, code = SubStatus.COMPLETED, "site configuration error", 0
            return code
        try:
            admit(site, SiteApps.of_site_file(site_file), fab)
        except (AppNotApproved, ApprovalListDamaged) as exc:
            log.error("%s", exc)
            push_message(client, _reply_error(message, context, site, APP_NOT_APPROVED,
                                              refusal_reason(exc, site.site_id)), context)
            status, details, code = SubStatus.COMPLETED, "app refused by the site", 0
            return code
        try:
            install_from_fab(fab.content, skip_prompt=True)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
        except Exception:  # install or load failed (the app's own handlers answer their errors themselves)
            ref = uuid.uuid4().hex[:12]
            log.exception("%s: the approved app failed to install or load (ref %s)", site.site_id, ref)
            reply = _reply_error(message, context, site, SITE_ERROR,
                                 f"site error (ref {ref}); the details stay in the site's own log")
        push_message(client, reply, context)
        status, details, code = SubStatus.COMPLETED, "", 0
    except Exception:
        log.exception("the ClientApp process could not serve its task")
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A deployed site's ClientApp process (started by site run)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--site-config", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    ensure_logging(logging.INFO)
    return run_task(runtime_api_address=args.runtime_api_address, token=args.token, site_file=args.site_config,
                    parent_pid=args.parent_pid)


if __name__ == "__main__":
    raise SystemExit(main())
