"""Users, passwords (argon2id, argon2-cffi), login sessions, roles, CSRF and login throttling.

A session is a random token in an HttpOnly, SameSite=Strict cookie (Secure under TLS); the database keeps
only its sha256. Every state-changing request must echo the session's CSRF token in `X-CSRF-Token`. There
is no default account: `medfusion-fl console add-user` creates the first one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from medfusion_fl.errors import ConfigError
from medfusion_fl.webconsole.db import LoginSession, User, now

ROLES = ("viewer", "operator", "admin")  # each can do what the ones before it can
COOKIE = "medfusion_session"
SESSION_HOURS = 12
MIN_PASSWORD = 10
_HASHER = PasswordHasher()
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_new_password(name: str, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password of {name!r} has {len(password)} characters; use at least {MIN_PASSWORD}")


def add_user(session: Session, name: str, role: str, password: str) -> User:
    if not _NAME.match(name):
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise ConfigError(f"--role {role!r}: choose one of {', '.join(ROLES)}")
    _check_new_password(name, password)
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise ConfigError(f"user {name!r} exists already; pick another name")
    user = User(name=name, role=role, password_hash=_HASHER.hash(password))
    session.add(user)
    session.commit()
    return user


def set_password(session: Session, user: User, password: str, *, keep_token: str | None = None) -> int:
    """A new password for `user`; every login session of theirs ends but the one of `keep_token` (the user's own,
    when they change it themselves). Returns how many sessions ended."""
    _check_new_password(user.name, password)
    user.password_hash = _HASHER.hash(password)
    kept = _digest(keep_token) if keep_token else None
    ended = 0
    for login in session.scalars(select(LoginSession).where(LoginSession.user_id == user.id)):
        if login.token_hash != kept:
            session.delete(login)
            ended += 1
    session.commit()
    return ended


_UNKNOWN_USER_HASH: list[str] = []  # a hash to verify against when the name is unknown, made once


def check_password(user: User | None, password: str) -> bool:
    """True for the right password. An unknown user costs one verification too, against a hash made once with the
    same parameters, so that the time of a refusal does not tell whether the name exists."""
    if not _UNKNOWN_USER_HASH:
        _UNKNOWN_USER_HASH.append(_HASHER.hash(secrets.token_urlsafe(24)))
    try:
        right = _HASHER.verify(user.password_hash if user else _UNKNOWN_USER_HASH[0], password)
    except (VerificationError, InvalidHashError):
        return False
    return right and user is not None


def has_role(user: User, needed: str) -> bool:
    return ROLES.index(user.role) >= ROLES.index(needed)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(session: Session, user: User) -> tuple[str, str]:
    """A new login session: (cookie token, CSRF token)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    session.add(LoginSession(token_hash=_digest(token), user_id=user.id, csrf=csrf,
                             expires=now() + dt.timedelta(hours=SESSION_HOURS)))
    session.commit()
    return token, csrf


def find_session(session: Session, token: str | None) -> tuple[User, LoginSession] | None:
    if not token:
        return None
    found = session.get(LoginSession, _digest(token))
    if found is None:
        return None
    expires = found.expires if found.expires.tzinfo else found.expires.replace(tzinfo=dt.UTC)  # SQLite drops tz
    if expires < now():
        session.delete(found)
        session.commit()
        return None
    user = session.get(User, found.user_id)
    return (user, found) if user is not None else None


def close_session(session: Session, token: str) -> None:
    found = session.get(LoginSession, _digest(token))
    if found is not None:
        session.delete(found)
        session.commit()


@dataclass
class LoginThrottle:
    """Failed logins within `window` s: at most `limit` for one user name from one client, then that pair waits;
    at most `client_limit` from one client whatever the names, then that client waits. A name is never locked
    for everyone: an attacker elsewhere cannot lock the admin out (their failures count against their own
    address)."""

    limit: int = 5
    client_limit: int = 20
    window: float = 300.0
    _failures: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _recent(self, key: tuple[str, str]) -> list[float]:
        cutoff = time.monotonic() - self.window
        kept = [t for t in self._failures.get(key, []) if t > cutoff]
        if kept:
            self._failures[key] = kept
        else:
            self._failures.pop(key, None)  # the table holds only keys with recent failures
        return kept

    def _wait(self, recent: list[float], limit: int) -> float:
        return max(0.0, recent[-limit] + self.window - time.monotonic()) if len(recent) >= limit else 0.0

    def blocked_for(self, client: str, name: str) -> float:
        """Seconds until `client` may try `name` again (0: now)."""
        with self._lock:
            pair = self._wait(self._recent((client, name)), self.limit)
            return max(pair, self._wait(self._recent((client, "")), self.client_limit))

    def failed(self, client: str, name: str) -> None:
        now_ = time.monotonic()
        with self._lock:
            self._failures[(client, name)] = [*self._recent((client, name)), now_]
            self._failures[(client, "")] = [*self._recent((client, "")), now_]

    def succeeded(self, client: str, name: str) -> None:
        with self._lock:
            self._failures.pop((client, name), None)
