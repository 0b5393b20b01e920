"""FastAPI dependencies: the database session, the logged-in user, a role, the CSRF check."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from medfusion_fl.webconsole.auth import COOKIE, find_session, has_role
from medfusion_fl.webconsole.db import LoginSession, User


def database(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


@dataclass
class Login:
    user: User
    session: LoginSession
    token: str


def login(request: Request, db: Annotated[Session, Depends(database)]) -> Login:
    token = request.cookies.get(COOKIE)
    found = find_session(db, token)
    if found is None or token is None:
        raise HTTPException(401, "not logged in: POST /api/login with a name and password first")
    return Login(found[0], found[1], token)


def role(needed: str) -> Callable[..., Login]:
    """A dependency that admits users of `needed` or a higher role, and checks CSRF on unsafe methods."""

    def check(request: Request, current: Annotated[Login, Depends(login)]) -> Login:
        if not has_role(current.user, needed):
            raise HTTPException(403, f"{current.user.name} is a {current.user.role}; this needs the {needed} role")
        if request.method not in ("GET", "HEAD", "OPTIONS") and \
                request.headers.get("X-CSRF-Token") != current.session.csrf:
            raise HTTPException(403, "missing or wrong X-CSRF-Token header (the token /api/login returned)")
        return current

    return check


DB = Annotated[Session, Depends(database)]
LoggedIn = Annotated[Login, Depends(login)]
Viewer = Annotated[Login, Depends(role("viewer"))]
Operator = Annotated[Login, Depends(role("operator"))]
Admin = Annotated[Login, Depends(role("admin"))]
