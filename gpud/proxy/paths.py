"""Which request paths the proxy relays, and the 404 for the ones it does not.

Every model-bearing POST route of vLLM's OpenAI server (0.32) is relayed by its `model`
field: OpenAI's, Anthropic's Messages API (vLLM serves `/v1/messages` itself, so gpud
routes it and never translates), the pooling family (a pooling model serves `/pooling`,
`/classify`, `/score` and `/rerank`), and speech-to-text, whose body is a multipart form.
No I/O and no state: the tables and the answer for a path outside them.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from .errors import error_response

# Bodies are JSON with a `model` key.
JSON_PATHS: Final = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v2/embed",
)
# Bodies are multipart forms with a `model` field (an audio file beside it): streamed through.
FORM_PATHS: Final = ("/v1/audio/transcriptions", "/v1/audio/translations")
INFERENCE_PATHS: Final = JSON_PATHS + FORM_PATHS


async def unknown_path(request: web.Request) -> web.Response:
    """A path under /v1/ that gpud does not relay: 404 naming the ones it does (or 405 when
    the path is relayed but not with this method)."""
    if request.path in INFERENCE_PATHS:
        resp = error_response(
            405, f"{request.method} is not allowed on {request.path}; use POST.",
            "method_not_allowed")
        resp.headers["Allow"] = "POST"
        return resp
    return error_response(
        404,
        f"gpud relays no {request.method} {request.path}. Supported: GET /v1/models, POST "
        + ", ".join(INFERENCE_PATHS) + ".",
        "unknown_path",
    )
