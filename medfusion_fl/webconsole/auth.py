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


def add_user(session: Session, name: str, role: str, password: str) -> User:
    if not _NAME.match(name):
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise ConfigError(f"--role {role!r}: choose one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password of {name!r} has {len(password)} characters; use at least {MIN_PASSWORD}")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise ConfigError(f"user {name!r} exists already; pick another name")
    user = User(name=name, role=role, password_hash=_HASHER.hash(password))
    session.add(user)
    session.commit()
    return user


def check_password(user: User | None, password: str) -> bool:
    """True for the right password; an unknown user costs a hash too (no timing oracle on names)."""
    try:
        return _HASHER.verify(user.password_hash if user else _HASHER.hash("x" * MIN_PASSWORD), password)
    except (VerificationError, InvalidHashError):
        return False


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
    """At most `limit` failed logins per user name within `window` s; then refused until the window passes."""

    limit: int = 5
    window: float = 300.0
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _recent(self, name: str) -> list[float]:
        cutoff = time.monotonic() - self.window
        kept = [t for t in self._failures.get(name, []) if t > cutoff]
        self._failures[name] = kept
        return kept

    def blocked_for(self, name: str) -> float:
        """Seconds until `name` may try again (0: now)."""
        with self._lock:
            recent = self._recent(name)
            return max(0.0, recent[0] + self.window - time.monotonic()) if len(recent) >= self.limit else 0.0

    def failed(self, name: str) -> None:
        with self._lock:
            self._recent(name).append(time.monotonic())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)
