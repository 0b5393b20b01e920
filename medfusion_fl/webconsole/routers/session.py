"""POST /api/login, POST /api/logout, GET /api/me, POST /api/me/password."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from medfusion_fl.errors import ConfigError
from medfusion_fl.webconsole.auth import (
    COOKIE,
    SESSION_HOURS,
    LoginThrottle,
    check_password,
    close_session,
    open_session,
    set_password,
)
from medfusion_fl.webconsole.db import User, audit
from medfusion_fl.webconsole.deps import DB, LoggedIn, Viewer

router = APIRouter(prefix="/api", tags=["session"])


class Credentials(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class PasswordChange(BaseModel):
    current: str = Field(min_length=1, max_length=1024)
    new: str = Field(min_length=1, max_length=1024)


class Me(BaseModel):
    name: str
    role: str
    csrf: str  # echo it in X-CSRF-Token on every POST


def _throttled(request: Request, name: str, what: str) -> tuple[LoginThrottle, str]:
    """The login throttle and the client's address; 429 with Retry-After while `name` waits from this address."""
    throttle: LoginThrottle = request.app.state.throttle
    client = request.client.host if request.client else ""
    wait = throttle.blocked_for(client, name)
    if wait > 0:
        raise HTTPException(429, f"too many {what} from this address; try again in {wait:.0f} s",
                            headers={"Retry-After": str(int(wait) + 1)})
    return throttle, client


@router.post("/login")
def post_login(body: Credentials, request: Request, response: Response, db: DB) -> Me:
    # a JSON body only (FastAPI refuses form posts here): a cross-site form cannot log a browser in
    throttle, client = _throttled(request, body.name, "failed logins")
    user = db.scalar(select(User).where(User.name == body.name))
    if not check_password(user, body.password) or user is None:  # a hash is verified for unknown names too
        throttle.failed(client, body.name)
        audit(db, body.name, "login-failed", client)
        raise HTTPException(401, "wrong user name or password")
    throttle.succeeded(client, body.name)
    token, csrf = open_session(db, user)
    audit(db, user.name, "login")
    response.set_cookie(COOKIE, token, max_age=SESSION_HOURS * 3600, httponly=True, samesite="strict",
                        secure=request.app.state.secure_cookies, path="/")
    return Me(name=user.name, role=user.role, csrf=csrf)


@router.post("/logout")
def post_logout(response: Response, current: Viewer, db: DB) -> dict[str, str]:
    close_session(db, current.token)
    audit(db, current.user.name, "logout")
    response.delete_cookie(COOKIE, path="/")
    return {"status": "logged out"}


@router.get("/me")
def get_me(current: LoggedIn) -> Me:
    return Me(name=current.user.name, role=current.user.role, csrf=current.session.csrf)


@router.post("/me/password")
def change_own_password(body: PasswordChange, request: Request, current: Viewer, db: DB) -> dict[str, str]:
    """A user changes their own password, proving the current one (throttled like a login); their other sessions
    end, this one stays."""
    name = current.user.name
    throttle, client = _throttled(request, name, "wrong passwords")
    if not check_password(current.user, body.current):
        throttle.failed(client, name)
        audit(db, name, "password-change-refused", "wrong current password")
        raise HTTPException(422, {"errors": {"current": "that is not your current password"}})
    try:
        ended = set_password(db, current.user, body.new, keep_token=current.token)
    except ConfigError as exc:
        raise HTTPException(422, {"errors": {"new": str(exc)}}) from None
    throttle.succeeded(client, name)
    audit(db, name, "change-password", f"{ended} other session(s) ended")
    return {"status": f"password changed; {ended} other session(s) logged out"}


@router.get("/openapi.json")
def get_openapi(request: Request, _: Viewer) -> dict[str, Any]:
    """The API's OpenAPI schema, for a logged-in user (it lists every route and field an attacker would probe)."""
    schema: dict[str, Any] = request.app.openapi()
    return schema
