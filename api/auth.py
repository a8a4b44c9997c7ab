"""Who is calling: a named token's owner, the legacy shared admin token, or the anonymous local admin.

Beyond loopback (settings.auth_required, or a request that arrived on a non-loopback address) every
endpoint but /health, /version and the static assets needs `Authorization: Bearer <token>`. On a
loopback server an anonymous caller is the local admin, so the embedded default needs no setup.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.deps import get_session
from api.schemas import json_error
from store.models import Job
from store.settings import Settings
from store.tokens import LEGACY_OWNER, find_token, has_tokens

log = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="An API token from `icd token create --name <you>` (admins: add --admin).",
)
HOW_TO_GET_ONE = "an admin creates one with `icd token create --name <you>` on a machine with the database settings"
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: json_error("Missing, unknown or revoked bearer token")}


@dataclass(frozen=True)
class Caller:
    """The identity a request acts as; `name` is recorded as the owner of the jobs it submits."""

    name: str | None
    admin: bool

    def can_see(self, job: Job) -> bool:
        return self.admin or job.owner == self.name


def get_caller(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    s: Session = Depends(get_session),
) -> Caller:
    """The caller, or 401 when the token is wrong or (beyond loopback) missing."""
    settings: Settings = request.app.state.settings
    if credentials is not None:
        given = credentials.credentials.strip()
        if settings.api_token and secrets.compare_digest(given.encode(), settings.api_token.encode()):
            return Caller(LEGACY_OWNER, admin=True)
        token = find_token(s, given)
        if token is None:
            raise _unauthorized(f"unknown or revoked token; {HOW_TO_GET_ONE}")
        return Caller(token.name, admin=token.admin)
    if settings.auth_required or _arrived_from_network(request):
        raise _unauthorized(f"this server needs a token: send 'Authorization: Bearer <token>'; {HOW_TO_GET_ONE}")
    return Caller(None, admin=True)


def _arrived_from_network(request: Request) -> bool:
    """True when the connection reached a non-loopback IP of this server (e.g. plain `uvicorn --host
    0.0.0.0` without ICD_LISTEN_HOST): such a request needs a token whatever the settings say."""
    server = request.scope.get("server")
    if not server:
        return False
    try:
        return not ipaddress.ip_address(str(server[0])).is_loopback
    except ValueError:  # not an address (an in-process test client): the settings decide
        return False


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


class StartupRefused(RuntimeError):
    """The server would be open to its network: no token exists, or no data roots are set."""


def check_exposure(settings: Settings, s: Session) -> None:
    """Refuse to listen beyond loopback without a token or without ICD_DATA_ROOTS; warn about ICD_API_TOKEN."""
    if settings.api_token:
        log.warning(
            "ICD_API_TOKEN is one shared admin token with no owner; create named tokens with "
            "`icd token create --name <you> [--admin]` and unset ICD_API_TOKEN"
        )
    if not settings.auth_required:
        return
    if not settings.api_token and not has_tokens(s):
        raise StartupRefused(
            f"refusing to listen on {settings.listen_host} with no API token: anyone on the network could submit "
            "and delete jobs. Create one first: `icd token create --name admin --admin` (same ICD_DATABASE_URL), "
            "or listen on 127.0.0.1"
        )
    if settings.beyond_loopback and not settings.data_roots:
        raise StartupRefused(
            f"refusing to listen on {settings.listen_host} without ICD_DATA_ROOTS: set it to the folders "
            "(colon-separated) that jobs may read datasets and checkpoints from"
        )
