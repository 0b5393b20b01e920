"""The site's own SuperExec: `medfusion-fl site run` supervises its SuperNode and serves its tasks.

The SuperNode runs with `--isolation process`, so it launches nothing itself: this loop asks its local
Runtime API for ClientApp tasks (AcquireTask, as Flower's flower-superexec does) and starts one
`python -m medfusion_fl.approval.clientapp` per task, which checks the app against the site's approval
list before anything of it is imported. Other task kinds are not served. The loop ends when the SuperNode
ends (its exit code is returned) or on SIGINT / SIGTERM, which stop the SuperNode and every task process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger("medfusion_fl.site")
POLL_SECONDS = 0.5


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _terminate(proc: subprocess.Popen[bytes], wait: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=wait)


def task_command(*, runtime_address: str, token: str, site_file: Path) -> list[str]:
    return [sys.executable, "-m", "medfusion_fl.approval.clientapp", "--runtime-api-address", runtime_address,
            "--token", token, "--site-config", str(site_file), "--parent-pid", str(os.getpid())]


def supervise(supernode_cmd: list[str], *, runtime_port: int, site_file: Path, env: Mapping[str, str]) -> int:
    """Start the SuperNode and serve its ClientApp tasks until it exits or a stop signal arrives."""
    runtime_address = f"127.0.0.1:{runtime_port}"
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    supernode = subprocess.Popen(supernode_cmd, env=dict(env))
    tasks: list[subprocess.Popen[bytes]] = []
    try:
        client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        log.info("serving ClientApp tasks of the SuperNode (pid %d) at %s; apps are checked against %s",
                 supernode.pid, runtime_address, site_file)
        while supernode.poll() is None:
            reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if reply.HasField("task") and reply.token:
                if reply.task.type != TaskType.CLIENT_APP.value:
                    log.error("task %d of type %r is not served at this site", reply.task.task_id, reply.task.type)
                else:
                    cmd = task_command(runtime_address=runtime_address, token=reply.token, site_file=site_file)
                    tasks.append(subprocess.Popen(cmd, env=dict(env)))
            tasks = [t for t in tasks if t.poll() is None]
            time.sleep(POLL_SECONDS)
        log.info("the SuperNode exited with code %s", supernode.returncode)
        return int(supernode.returncode or 0)
    except _Stop as stop:
        log.info("%s: stopping the SuperNode and %d task process(es)", stop, len(tasks))
        return 0
    finally:
        for proc in [*tasks, supernode]:
            _terminate(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
