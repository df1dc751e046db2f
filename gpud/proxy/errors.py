"""gpud's own errors on the inference endpoint, in OpenAI's error JSON shape.

No I/O: builds responses only.
"""

from __future__ import annotations

import math

from aiohttp import web

from .api import ModelRoute


def error_response(
    status: int,
    message: str,
    code: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    retry_after: float | None = None,
) -> web.Response:
    """gpud's own error, in OpenAI's error JSON shape, with a `gpud_` code."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": f"gpud_{code}"}}
    headers = None
    if retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return web.json_response(body, status=status, headers=headers)


class Reject(Exception):
    """Raised inside the handler to answer with an error response."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


def timed_out(route: ModelRoute, what: str) -> web.Response:
    return error_response(
        503,
        f"The model {route.name!r} did not get {what} within its request_timeout "
        f"({route.request_timeout:g} s); retry later.",
        "request_timeout",
        type_="service_unavailable",
        retry_after=min(max(route.request_timeout / 4, 1.0), 30.0),
    )


def unreachable(route: ModelRoute, exc: BaseException) -> web.Response:
    return error_response(
        502,
        f"The engine of {route.name!r} did not answer ({exc}); gpud restarts it if it died.",
        "upstream_unreachable",
        type_="service_unavailable",
    )


def broken(route: ModelRoute, exc: BaseException) -> web.Response:
    return error_response(
        502,
        f"The engine of {route.name!r} broke off its answer ({exc}).",
        "upstream_broken",
        type_="service_unavailable",
    )
