"""The console's database (SQLAlchemy): users, sessions and the audit table, and the index of the run folders
(runs, rounds, per-site results with their privacy spend, model versions).

SQLite (WAL mode, so readers do not block the indexer; a 30 s busy timeout, so two consoles on one file
wait for each other) by default; any SQLAlchemy URL, e.g. postgresql://..., with `--database`. The index
tables are a cache of the folders: when their layout changes (INDEX_SCHEMA) they are rebuilt from the
folders, and the users, sessions and audit rows are kept.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from medfusion_fl.errors import ConfigError

log = logging.getLogger(__name__)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A stored time in UTC with its zone: SQLite gives back the UTC times it was given without one."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


UTCDateTime = Annotated[dt.datetime, AfterValidator(as_utc)]  # sent as 2026-12-08T01:40:00Z: the page shows it local


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer, operator, admin
    password_hash: Mapped[str] = mapped_column(String(256))
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)


class LoginSession(Base):
    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's token
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    expires: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class RunRow(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # run.json's run id, else the folder name
    folder: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(String(256))
    rounds: Mapped[int] = mapped_column(Integer, default=0)  # metrics lines read
    last_round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(32))  # ok / failed / ... of the last line, "empty", "missing"
    has_model: Mapped[int] = mapped_column(Integer, default=0)
    problems: Mapped[list[str]] = mapped_column(JSON, default=list)  # lines that could not be read, and why
    indexed: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    # how far metrics.jsonl has been read: a file whose bytes before `offset` still hash to `tail_hash` is
    # read from `offset` on, any other (a resume moved lines aside) from the start
    offset: Mapped[int] = mapped_column(Integer, default=0)
    tail_hash: Mapped[str] = mapped_column(String(32), default="")
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    versions_key: Mapped[str] = mapped_column(String(64), default="")  # the checkpoints' and exports' stat


class RoundRow(Base):
    __tablename__ = "rounds"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(32))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)  # the metrics line itself


class SiteRoundRow(Base):
    __tablename__ = "site_rounds"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(64))  # trained, failed (stage), dropped from secure aggregation
    reason: Mapped[str] = mapped_column(Text, default="")
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)  # cumulative, as the site reported it
    budget: Mapped[float | None] = mapped_column(Float, nullable=True)


class SiteLatestRow(Base):
    """Each site's latest round row (what a run page shows first), kept by the indexer."""

    __tablename__ = "site_latest"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    site: Mapped[str] = mapped_column(String(128), primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    budget: Mapped[float | None] = mapped_column(Float, nullable=True)


class VersionRow(Base):
    __tablename__ = "versions"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # round-0003, model.onnx, exports/round-0002
    kind: Mapped[str] = mapped_column(String(16))  # checkpoint or export
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


INDEX_SCHEMA = "3"  # bump when a column of the index tables changes
INDEX_TABLES = (VersionRow, SiteLatestRow, SiteRoundRow, RoundRow, RunRow)
# more connections than the ASGI thread pool's 40 threads: a request holding a connection while it waits
# for a thread would otherwise starve the requests holding threads while they wait for a connection
POOL = {"pool_size": 48, "max_overflow": 16}


class Audit(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    when: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    who: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")


AUDIT_DETAIL = 2000  # characters of an audit row's detail kept; longer ones are cut, saying how long they were


def audit(session: Session, who: str, action: str, detail: str = "") -> None:
    """Record who did what in the audit table (committed at once: an action is never left unrecorded). Each
    field is bounded: a refused 50 MB request must not become a 50 MB row."""
    if len(detail) > AUDIT_DETAIL:
        detail = f"{detail[:AUDIT_DETAIL]}... [{len(detail)} characters, cut at {AUDIT_DETAIL}]"
    session.add(Audit(who=who[:64], action=action[:64], detail=detail))
    session.commit()


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _private_sqlite_file(url: str) -> None:
    """The SQLite file holds password hashes, session and CSRF token digests and the audit: mode 0600, created so
    (SQLite gives its -wal and -shm files the database file's mode). A file that other users may write is refused:
    they could have planted an account."""
    try:
        database = make_url(url).database
    except ArgumentError:  # not a URL: create_engine says so, with the fix
        return
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o022:
            raise ConfigError(f"--database {url!r}: {path} may be written by other users (mode {mode:o}); check "
                              f"its users table for accounts you did not add, then `chmod 600 {path}`")
    elif path.parent.is_dir():  # a missing folder: SQLite's own error names it
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if part.exists():
            os.chmod(part, 0o600)


def open_database(url: str) -> sessionmaker:  # type: ignore[type-arg]
    """An engine for `url` with every table created; SQLite files get WAL mode and mode 0600."""
    sqlite = url.startswith("sqlite")
    if sqlite:
        _private_sqlite_file(url)
    try:
        engine: Engine = create_engine(url, connect_args={"timeout": 30} if sqlite else {}, **POOL)
    except (ImportError, ArgumentError) as exc:  # no driver installed, or not a database URL
        raise ConfigError(f"--database {url!r}: {exc}. Give an SQLAlchemy URL whose driver is installed, e.g. "
                          "postgresql+psycopg://USER@HOST/DB after `pip install psycopg[binary]`, or leave it out "
                          "for SQLite in the runs folder") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_wal)
    try:
        _rebuild_stale_index(engine)
    except OperationalError as exc:  # the server is down, the file's folder is missing, the password is wrong
        raise ConfigError(f"--database {url!r}: cannot open it ({str(exc.orig).strip()}); check that it is "
                          "running and reachable, and the URL's user, host and database name") from None
    try:
        Base.metadata.create_all(engine)
    except OperationalError:  # a second console on the same database created the tables meanwhile
        Base.metadata.create_all(engine)
    with Session(engine) as session:
        try:
            session.merge(Meta(key="index-schema", value=INDEX_SCHEMA))
            session.commit()
        except IntegrityError:  # a second console opening the same database wrote it first
            session.rollback()
    return sessionmaker(engine, expire_on_commit=False)


def _rebuild_stale_index(engine: Engine) -> None:
    """Drop the index tables when an older console laid them out differently (they are refilled from the
    folders); users, sessions and the audit table stay."""
    tables = set(inspect(engine).get_table_names())
    if "runs" not in tables:
        return
    version = None
    if "meta" in tables:
        with Session(engine) as session:
            row = session.get(Meta, "index-schema")
            version = row.value if row is not None else None
    if version == INDEX_SCHEMA:
        return
    log.warning("the console database's run index was made by an older console; rebuilding it from the run "
                "folders (users and the audit table are kept)")
    for table in INDEX_TABLES:
        table.__table__.drop(engine, checkfirst=True)  # type: ignore[attr-defined]

