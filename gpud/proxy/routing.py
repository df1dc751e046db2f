"""Reading an inference request: which model it names, and the headers relayed for it.

Pure request parsing: no I/O, no state; the routes come from the caller (`Proxy.resolve`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final

from aiohttp import web

from .api import ModelRoute
from .auth import ApiKey
from .errors import Reject, error_response

# Paths whose `model` field vLLM treats as optional: one model served, it is used.
MODEL_OPTIONAL: Final = frozenset({"/tokenize", "/detokenize"})
# Headers worth relaying; everything hop-by-hop or gpud's own (Authorization) stays behind.
FORWARD_REQUEST_HEADERS: Final = ("Accept", "X-Request-Id", "Traceparent")


def request_headers(request: web.Request) -> bytes:
    """The header lines relayed to the engine, each ending in CRLF."""
    rh = request.headers
    extra = b"Content-Type: " + _encoded(rh.get("Content-Type", "application/json"),
                                         "Content-Type") + b"\r\n"
    for h in FORWARD_REQUEST_HEADERS:
        v = rh.get(h)
        if v is not None:
            extra += h.encode() + b": " + _encoded(v, h) + b"\r\n"
    return extra


def _encoded(value: str, name: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:  # aiohttp keeps bytes that are not UTF-8 as surrogates
        raise Reject(error_response(400, f"The {name} header is not valid UTF-8.",
                                    "bad_header", param=name)) from None


def rename_request(body: bytes, name: str) -> bytes:
    """The body with `model` set to the engine's served name (an alias was asked for)."""
    payload = json.loads(body)
    payload["model"] = name
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def unknown_model(routes: Mapping[str, ModelRoute], name: str, key: ApiKey | None) -> Reject:
    known = sorted(n for n in routes if key is None or key.allows(n))
    return Reject(
        error_response(
            404,
            f"The model {name!r} does not exist. Known models: {', '.join(known) or '(none)'}.",
            "model_not_found",
            param="model",
        )
    )


def _model_field(body: bytes) -> object:
    try:
        payload = json.loads(body)
    except ValueError:
        raise Reject(
            error_response(400, "The request body is not valid JSON.", "invalid_json")
        ) from None
    except RecursionError:
        raise Reject(
            error_response(400, "The request body is nested too deeply to read.", "too_deep")
        ) from None
    return payload.get("model") if isinstance(payload, dict) else None


def route_for(
    routes: Mapping[str, ModelRoute], resolve: Callable[[str], ModelRoute | None],
    body: bytes, path: str, key: ApiKey | None,
) -> tuple[ModelRoute, str | None]:
    """The route of the request, and the alias it named (None: the model's own name)."""
    name = _model_field(body)
    if name is None and path in MODEL_OPTIONAL and len(routes) == 1:
        return next(iter(routes.values())), None
    return route_named(routes, resolve, name, key)


def route_named(
    routes: Mapping[str, ModelRoute], resolve: Callable[[str], ModelRoute | None],
    name: object, key: ApiKey | None,
) -> tuple[ModelRoute, str | None]:
    """`route_for` once the model's name was read (from JSON or a form field)."""
    if not isinstance(name, str):
        known = ", ".join(sorted(routes))
        raise Reject(
            error_response(
                400,
                f"Name the model in the `model` field. Known models: {known or '(none)'}.",
                "model_required",
                param="model",
            )
        )
    route = resolve(name)
    if route is None or (key is not None and not key.allows(route.name)):
        if route is not None and key is not None:
            raise Reject(
                error_response(
                    403,
                    f"The API key {key.name!r} may not use the model {route.name!r}.",
                    "model_not_allowed",
                    type_="permission_error",
                    param="model",
                )
            )
        raise unknown_model(routes, name, key)
    return route, (None if name == route.name else name)
