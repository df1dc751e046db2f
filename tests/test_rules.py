"""Request rules (issue 19): each kind on a body, the config that declares them, and the
proxy relaying a request no rule touches byte for byte to a real aiohttp upstream.

The engine's side (what vLLM does with a ruled request) is tests/test_e2e_rules.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_config import gpud
from test_proxy import (
    CHAT_BODY,
    ROUTES,
    Env,
    FakeBackend,
    Recorder,
    Upstream,
    make_upstream_app,
    serve,
)

from gpud.config import ConfigError, load_config
from gpud.proxy import ModelRoute, Proxy
from gpud.proxy.rules import RequestRules

CHAT = "/v1/chat/completions"
RULES = RequestRules(default={"temperature": 0.7, "chat_template_kwargs": {"a": 1}},
                     force={"seed": 7}, strip=("logit_bias",), cap={"max_tokens": 16})


def applied(rules: RequestRules, body: dict[str, Any], path: str = CHAT) -> dict[str, Any] | None:
    out = rules.apply(json.dumps(body).encode(), path)
    return None if out is None else json.loads(out)


# -- each kind on a body ----------------------------------------------------------------


def test_default_sets_only_what_the_client_left_out() -> None:
    r = RequestRules(default={"temperature": 0.7, "chat_template_kwargs": {"a": 1, "b": 2}})
    assert applied(r, {"model": "m"}) == {
        "model": "m", "temperature": 0.7, "chat_template_kwargs": {"a": 1, "b": 2}}
    got = applied(r, {"model": "m", "temperature": 0.0, "chat_template_kwargs": {"a": 5}})
    assert got == {"model": "m", "temperature": 0.0, "chat_template_kwargs": {"a": 5, "b": 2}}
    assert applied(r, {"model": "m", "temperature": 1, "chat_template_kwargs": {"a": 0, "b": 0}}
                   ) is None  # all there: nothing to re-encode


def test_force_always_sets_and_merges_into_a_table() -> None:
    r = RequestRules(force={"seed": 7, "chat_template_kwargs": {"enable_thinking": False}})
    got = applied(r, {"model": "m", "seed": 1, "chat_template_kwargs": {"x": 1}})
    assert got == {"model": "m", "seed": 7,
                   "chat_template_kwargs": {"x": 1, "enable_thinking": False}}
    assert applied(r, {"model": "m", "seed": 7,
                       "chat_template_kwargs": {"enable_thinking": False}}) is None
    # 1 is not true on the wire: a forced boolean replaces a number that equals it
    assert applied(RequestRules(force={"stream": True}), {"stream": 1}) == {"stream": True}


def test_strip_removes_keys() -> None:
    r = RequestRules(strip=("logit_bias", "user"))
    assert applied(r, {"model": "m", "logit_bias": {"1": 5}, "user": "u"}) == {"model": "m"}
    assert applied(r, {"model": "m"}) is None


def test_cap_clamps_both_names_of_max_tokens_and_sets_it_when_absent() -> None:
    r = RequestRules(cap={"max_tokens": 16.0})
    assert applied(r, {"max_tokens": 100}) == {"max_tokens": 16}  # an int, as vLLM wants
    assert applied(r, {"max_tokens": 8}) is None
    assert applied(r, {"max_completion_tokens": 100}) == {"max_completion_tokens": 16}
    assert applied(r, {"max_tokens": 9, "max_completion_tokens": 100}) == {
        "max_tokens": 9, "max_completion_tokens": 16}
    assert applied(r, {"model": "m"}) == {"model": "m", "max_tokens": 16}
    assert applied(r, {"max_tokens": None}) == {"max_tokens": 16}
    assert applied(r, {"input": "x"}, "/v1/embeddings") is None  # no generation: not set
    assert applied(RequestRules(cap={"temperature": 1.5}), {"temperature": 2}) == {
        "temperature": 1.5}


def test_bodies_that_are_not_json_objects_are_left_to_the_engine() -> None:
    assert RULES.apply(b"[1, 2]", CHAT) is None
    assert RULES.apply(b"not json", CHAT) is None
    assert RULES.apply(b"[" * 100_000, CHAT) is None


# -- the config -------------------------------------------------------------------------


def test_rules_load_from_the_models_table(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text('[models.chat]\nsource = "org/m"\nrouting = "prefix"\n\n'
                    '[models.chat.rules]\ndefault = { temperature = 0.7 }\n'
                    'force = { chat_template_kwargs = { enable_thinking = false } }\n'
                    'strip = ["logit_bias"]\ncap = { max_tokens = 512 }\n')
    m = load_config(path).config.models["chat"]
    assert m.routing == "prefix"
    assert m.rules is not None
    assert m.rules.describe() == [
        "default temperature = 0.7", 'force chat_template_kwargs = {"enable_thinking": false}',
        "strip logit_bias", "cap max_tokens <= 512"]


@pytest.mark.parametrize(("table", "key", "says"), [
    ('force = { model = "other" }', "models.chat.rules.force", "names the model"),
    ('cap = { max_tokens = 0 }', "models.chat.rules.cap", "above 0"),
    ('cap = { max_tokens = "512" }', "models.chat.rules.cap", "above 0"),
    ('strip = ["seed"]\nforce = { seed = 1 }', "models.chat.rules", "both in force and in strip"),
    ('defaults = { seed = 1 }', "models.chat.rules.defaults", "default"),
])
def test_bad_rules_name_the_file_line_and_key(tmp_path: Path, table: str, key: str,
                                              says: str) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text(f'[models.chat]\nsource = "org/m"\n\n[models.chat.rules]\n{table}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    [e] = err.value.errors
    assert e.key == key and says in e.message
    assert e.file == str(path) and e.line >= 4
    result = gpud("check", str(path))
    assert result.returncode == 1 and f"{key}:" in result.stderr


def test_a_bad_routing_is_named(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text('[models.chat]\nsource = "org/m"\nrouting = "sticky"\n')
    result = gpud("check", str(path))
    assert result.returncode == 1
    assert f"{path}:3:" in result.stderr and "models.chat.routing" in result.stderr


# -- through the proxy, against a real upstream that keeps the bytes it got ----------------


@pytest.fixture
async def ruled() -> AsyncIterator[Env]:
    up = Upstream()
    up_runner, up.url = await serve(make_upstream_app(up))
    routes = {**ROUTES, "ruled": ModelRoute("ruled", aliases=("ruled-alias",), rules=RULES)}
    backend = FakeBackend(up.url, routes)
    proxy = Proxy(backend)
    runner, url = await serve(proxy.make_app())
    async with aiohttp.ClientSession() as http:
        yield Env(up, backend, proxy, url, http, Recorder())
    await runner.cleanup()
    await up_runner.cleanup()


# Odd spacing and key order, non-ASCII escapes: any re-encoding would show.
UNTOUCHED = ('{ "model" : "%s", "messages":[{"role":"user","content":"h\\u00e9 \\ud83d\\ude00"}],'
             '  "temperature":1.0, "chat_template_kwargs":{"a":2},"seed":7,"max_tokens":3 }')


@pytest.mark.parametrize("model", ["ruled", "chat"])
async def test_a_request_no_rule_touches_is_relayed_byte_for_byte(ruled: Env, model: str) -> None:
    raw = (UNTOUCHED % model).encode()
    r = await ruled.http.post(ruled.url + CHAT, data=raw,
                              headers={"Content-Type": "application/json"})
    assert r.status == 200 and await r.read() == CHAT_BODY % model.encode()
    assert ruled.up.raw[-1] == raw


async def test_a_ruled_request_reaches_the_engine_changed(ruled: Env) -> None:
    body = {"model": "ruled-alias", "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {"5": 1}, "seed": 1, "max_tokens": 999}
    r = await ruled.post(CHAT, body)
    assert r.status == 200
    assert json.loads(await r.read())["model"] == "ruled-alias"
    assert ruled.up.seen[-1] == {
        "model": "ruled", "messages": [{"role": "user", "content": "hi"}], "seed": 7,
        "max_tokens": 16, "temperature": 0.7, "chat_template_kwargs": {"a": 1}}
