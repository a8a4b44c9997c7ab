"""Request bodies in YAML as well as JSON: a spec file can be POSTed as it is (`application/yaml`).

FastAPI parses only JSON bodies; anything else reached validation as raw bytes and came back as a 422
on field "". This route class turns a YAML body into the equivalent JSON before FastAPI sees it, and
answers 415 (naming the accepted types) for any other media type.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute

from icd_core.safe_yaml import YamlRefused, load_yaml

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
ACCEPTED = ("application/json", *YAML_TYPES)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class YamlBodyRoute(APIRoute):
    """An APIRoute whose JSON body may also be sent as YAML; other body types get a 415."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # no body: nothing to convert
            return handler

        async def route(request: Request) -> Response:
            media = _media_type(request)
            if media in YAML_TYPES:
                request = await _as_json(request)
            elif media and media != "application/json" and not media.endswith("+json"):
                raise HTTPException(
                    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                    detail=f"unsupported Content-Type {media!r}: send the spec as {' or '.join(ACCEPTED)}",
                )
            return await handler(request)

        return route


async def _as_json(request: Request) -> Request:
    """The same request with its YAML body re-encoded as JSON (a 422 naming the line when it does not parse)."""
    raw = await request.body()
    try:
        data: Any = load_yaml(raw.decode("utf-8")) if raw.strip() else None
    except (YamlRefused, UnicodeDecodeError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            why = f"the body is not valid YAML: not UTF-8 ({exc.reason})"
        elif exc.where is not None:
            why = f"the body is not valid YAML (line:column {exc.where}): {exc.problem.removeprefix('invalid YAML: ')}"
        else:
            why = f"the body is refused: {exc}"
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[{"loc": ["body"], "field": "", "msg": why, "type": "yaml"}],
        ) from exc
    body = json.dumps(data, default=str).encode()
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {**request.scope, "headers": headers}
    converted = Request(scope, request.receive)
    converted._body = body  # starlette reads a cached body first; the stream was consumed above
    return converted


YAML_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/yaml": {
                "schema": {"type": "string", "description": "The same spec as a YAML document (a spec file as is)."}
            }
        }
    }
}
