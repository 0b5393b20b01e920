"""`medfusion-fl console [--runs DIR] [--host 127.0.0.1] [--port 8080] [--tls-cert F --tls-key F]` and
`medfusion-fl console add-user NAME --role ROLE`."""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from medfusion_fl.errors import ConfigError, MissingExtra

log = logging.getLogger("medfusion_fl.cli")
CONSOLE_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "argon2", "websockets")  # the `console` extra's packages


def require_console() -> None:
    """The console's own dependencies are an extra (a site does not install them): say which are missing and the
    command that adds them, before anything imports them."""
    missing = []
    for name in CONSOLE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"the console needs {', '.join(missing)}, which this install lacks (a site's install "
                           "leaves them out): pip install 'medfusion-fl[console]'")


def _database(args: argparse.Namespace) -> str:
    from medfusion_fl.webconsole.app import default_database

    if not Path(args.runs).is_dir():
        raise ConfigError(f"--runs {args.runs}: not a folder; pass the folder holding the run folders (runs/)")
    return str(args.database or default_database(Path(args.runs)))


def cmd_console(args: argparse.Namespace) -> int:
    require_console()
    if args.console_command == "add-user":
        return cmd_add_user(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together; pass both (or neither for plain HTTP on 127.0.0.1)")
    import uvicorn

    from medfusion_fl.webconsole.app import create_app

    app = create_app(runs_dir=Path(args.runs), database=_database(args), secure_cookies=bool(args.tls_cert),
                     app_dir=Path(args.app), superlink=args.superlink,
                     data_roots=tuple(Path(root) for root in args.data_root),
                     strategy_modules=tuple(args.strategy_module))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.tls_cert:
        log.warning("console on %s without TLS: passwords and session cookies cross the network in clear; "
                    "pass --tls-cert and --tls-key", args.host)
    log.info("console on %s://%s:%d, indexing %s", "https" if args.tls_cert else "http", args.host, args.port,
             args.runs)
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                log_level="warning")
    return 0


def cmd_add_user(args: argparse.Namespace) -> int:
    from medfusion_fl.webconsole.auth import add_user
    from medfusion_fl.webconsole.db import audit, open_database

    database = _database(args)  # a wrong --runs is refused before the password is asked for
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ; nothing was stored")
    with open_database(database)() as session:
        add_user(session, args.name, args.role, password)
        audit(session, "cli", "add-user", f"{args.name} ({args.role})")
    sys.stdout.write(f"user {args.name} ({args.role}) added\n")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("console", help="the coordinator's web console (and add-user)")
    p.add_argument("--runs", default="runs", help="the folder holding run folders (default: runs)")
    p.add_argument("--database", help="SQLAlchemy URL (default: sqlite:///<runs>/console.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--app", default=".", help="the app folder whose presets runs start from (default: current)")
    p.add_argument("--superlink", help="the flwr connection name of the SuperLink that deployment runs use "
                   "(their stop button calls `flwr stop ID NAME`)")
    p.add_argument("--data-root", action="append", default=[], metavar="FOLDER",
                   help="a folder whose files operators may name in a start request (data.test-path, init.path, "
                        "output.resume-from); repeat for several. Default: none")
    p.add_argument("--strategy-module", action="append", default=[], metavar="MODULE",
                   help="a module whose module:Class strategies operators may start (the coordinator imports it); "
                        "repeat for several. Default: none (the built-in strategies only)")
    p.add_argument("--tls-cert", help="PEM certificate (with --tls-key): HTTPS and Secure cookies")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.set_defaults(func=cmd_console, console_command=None)
    users = p.add_subparsers(dest="console_command")
    q = users.add_parser("add-user", help="create a console user (the password is prompted for)")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    q.add_argument("--runs", default=argparse.SUPPRESS, help="as for console (either place)")
    q.add_argument("--database", default=argparse.SUPPRESS, help="as for console (either place)")
    q.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
