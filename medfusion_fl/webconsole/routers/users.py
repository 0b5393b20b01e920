"""GET/POST /api/users, PATCH/DELETE /api/users/{name}, POST /api/users/{name}/password, GET /api/audit: the
admin's rooms."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import delete, select

from medfusion_fl.errors import ConfigError
from medfusion_fl.webconsole.auth import ROLES, add_user, set_password
from medfusion_fl.webconsole.db import Audit, LoginSession, User, UTCDateTime, audit
from medfusion_fl.webconsole.deps import DB, Admin

router = APIRouter(prefix="/api", tags=["users"])


class UserOut(BaseModel):
    name: str
    role: str
    created: UTCDateTime


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: str = Field(description=f"one of {', '.join(ROLES)}")
    password: str = Field(min_length=1, max_length=1024)


class RoleChange(BaseModel):
    role: str = Field(description=f"one of {', '.join(ROLES)}")


class PasswordReset(BaseModel):
    password: str = Field(min_length=1, max_length=1024)


class AuditOut(BaseModel):
    when: UTCDateTime
    who: str
    action: str
    detail: str


def _user(db: DB, name: str) -> User:
    user = db.scalar(select(User).where(User.name == name))
    if user is None:
        raise HTTPException(404, f"no user {name!r}")
    return user


@router.get("/users")
def list_users(_: Admin, db: DB) -> list[UserOut]:
    return [UserOut(name=u.name, role=u.role, created=u.created) for u in db.scalars(select(User).order_by(User.name))]


@router.post("/users", status_code=201)
def create_user(body: NewUser, current: Admin, db: DB) -> UserOut:
    try:
        user = add_user(db, body.name, body.role, body.password)
    except ConfigError as exc:
        raise HTTPException(422, {"errors": {_field(str(exc)): str(exc)}}) from None
    audit(db, current.user.name, "add-user", f"{body.name} ({body.role})")
    return UserOut(name=user.name, role=user.role, created=user.created)


def _field(message: str) -> str:
    return "password" if "password" in message else "role" if "--role" in message else "name"


@router.patch("/users/{name}")
def change_role(name: str, body: RoleChange, current: Admin, db: DB) -> UserOut:
    if body.role not in ROLES:
        raise HTTPException(422, {"errors": {"role": f"role {body.role!r}: one of {', '.join(ROLES)}"}})
    user = _user(db, name)
    if user.id == current.user.id and body.role != "admin":
        raise HTTPException(409, "an admin cannot lower their own role (another admin can)")
    old, user.role = user.role, body.role
    db.commit()
    audit(db, current.user.name, "change-role", f"{name}: {old} -> {body.role}")
    return UserOut(name=user.name, role=user.role, created=user.created)


@router.delete("/users/{name}")
def remove_user(name: str, current: Admin, db: DB) -> dict[str, str]:
    user = _user(db, name)
    if user.id == current.user.id:
        raise HTTPException(409, "an admin cannot remove their own account (another admin can)")
    db.execute(delete(LoginSession).where(LoginSession.user_id == user.id))  # logged out everywhere at once
    db.delete(user)
    db.commit()
    audit(db, current.user.name, "remove-user", name)
    return {"status": f"user {name} removed"}


@router.post("/users/{name}/password")
def reset_password(name: str, body: PasswordReset, current: Admin, db: DB) -> dict[str, str]:
    """An admin sets another user's password (one they forgot); every session of that user ends. An admin's own
    password is changed with POST /api/me/password, which asks for the current one."""
    user = _user(db, name)
    if user.id == current.user.id:
        raise HTTPException(409, "change your own password with POST /api/me/password (it asks for the current one)")
    try:
        ended = set_password(db, user, body.password)
    except ConfigError as exc:
        raise HTTPException(422, {"errors": {"password": str(exc)}}) from None
    audit(db, current.user.name, "reset-password", f"{name}: {ended} session(s) ended")
    return {"status": f"password of {name} reset; {ended} session(s) logged out"}


@router.get("/audit")
def list_audit(_: Admin, db: DB, limit: int = Query(100, ge=1, le=1000)) -> list[AuditOut]:
    rows = db.scalars(select(Audit).order_by(Audit.id.desc()).limit(limit))
    return [AuditOut(when=r.when, who=r.who, action=r.action, detail=r.detail) for r in rows]
