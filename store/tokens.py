"""Named API tokens: create (the secret is shown once), list, revoke, and look up a presented secret."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from store.models import ApiToken

SECRET_PREFIX = "icd_"  # recognisable in logs and secret scanners
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


class TokenError(ValueError):
    """A token name that is invalid, taken, or unknown."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(s: Session, name: str, admin: bool = False) -> tuple[ApiToken, str]:
    """A new token and its secret (256 random bits); only the secret's sha256 is stored."""
    if not _NAME.match(name):
        raise TokenError(f"token name {name!r}: 1-100 letters, digits, '.', '_', '@' or '-', starting alphanumeric")
    if s.execute(select(ApiToken.id).where(ApiToken.name == name)).first() is not None:
        raise TokenError(f"a token named {name!r} exists; revoke it first or choose another name")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, secret_sha256=secret_hash(secret), admin=admin)
    s.add(token)
    s.commit()
    return token, secret


def list_tokens(s: Session) -> list[ApiToken]:
    return list(s.execute(select(ApiToken).order_by(ApiToken.name)).scalars())


def revoke_token(s: Session, name: str) -> None:
    """Delete the token: its secret stops working at once; the jobs it owns keep its name as owner."""
    res = s.execute(delete(ApiToken).where(ApiToken.name == name))
    s.commit()
    if not res.rowcount:  # type: ignore[attr-defined]
        raise TokenError(f"no token named {name!r} (see `icd token list`)")


def find_token(s: Session, secret: str) -> ApiToken | None:
    """The token whose secret this is, or None."""
    return s.execute(select(ApiToken).where(ApiToken.secret_sha256 == secret_hash(secret))).scalar_one_or_none()


def has_tokens(s: Session) -> bool:
    return s.execute(select(ApiToken.id).limit(1)).first() is not None
