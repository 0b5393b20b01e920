"""The console's database (SQLAlchemy): users, sessions, runs, rounds and the audit table.

SQLite (WAL mode, so readers do not block the indexer) by default; any SQLAlchemy URL, e.g.
postgresql://..., with `--database`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


class RoundRow(Base):
    __tablename__ = "rounds"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(32))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)  # the metrics line itself


class Audit(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    when: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    who: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")


def audit(session: Session, who: str, action: str, detail: str = "") -> None:
    """Record who did what in the audit table (committed at once: an action is never left unrecorded)."""
    session.add(Audit(who=who, action=action, detail=detail))
    session.commit()


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_database(url: str) -> sessionmaker:  # type: ignore[type-arg]
    """An engine for `url` with every table created; SQLite files get WAL mode."""
    engine: Engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_wal)
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)
