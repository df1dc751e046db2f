"""Prefix-affine replica choice (issue 19): a conversation's key stays the same over its
turns, and its turns go back to their replica unless that one is too busy or gone.

The engines' side (prefix-cache hits, time to first token) is bench/prefix_affinity.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_loop import DataLoop, at

from gpud.proxy.affinity import AffinityTable, conversation_key
from gpud.states import State

SYSTEM = {"role": "system", "content": "You are terse."}


def key(**body: Any) -> str | None:
    return conversation_key(json.dumps({"model": "chat", **body}).encode())


def test_every_turn_of_a_conversation_has_its_first_turns_key() -> None:
    turn1 = [SYSTEM, {"role": "user", "content": "tell me about ships"}]
    turn2 = [*turn1, {"role": "assistant", "content": "ships float"},
             {"role": "user", "content": "and boats?"}]
    assert key(messages=turn1) == key(messages=turn2) is not None
    other = [SYSTEM, {"role": "user", "content": "tell me about trains"}]
    assert key(messages=other) != key(messages=turn1)
    assert key(messages=turn1[1:]) != key(messages=turn1)  # the system prompt counts
    assert key(system="be terse", messages=turn1[1:]) != key(messages=turn1[1:])  # anthropic


def test_prompts_and_the_user_field_name_a_conversation_too() -> None:
    doc = "x" * 5000
    assert key(prompt=doc + "first question") == key(prompt=doc + "second question")
    assert key(prompt="a short one") != key(prompt="another one")
    assert key(input="some text") is not None
    assert key(user="alice") == key(user="alice") != key(user="bob")


def test_no_conversation_no_key() -> None:
    assert key() is None
    assert key(messages=[]) is None
    assert conversation_key(b"not json") is None
    assert conversation_key(b"[1]") is None


def test_a_conversation_goes_back_to_its_replica_within_the_margin() -> None:
    t = AffinityTable()
    load = {"a": 0, "b": 0}
    assert t.choose("chat", "k1", ["a", "b"], "a", load.get, margin=2) == "a"  # first: least
    load["a"] = 2
    assert t.choose("chat", "k1", ["a", "b"], "b", load.get, margin=2) == "a"  # followed
    load["a"] = 3
    assert t.choose("chat", "k1", ["a", "b"], "b", load.get, margin=2) == "b"  # too busy
    load["a"] = 0
    assert t.choose("chat", "k1", ["a", "b"], "a", load.get, margin=2) == "b"  # stays moved
    assert t.choose("chat", "k1", ["a"], "a", load.get, margin=2) == "a"  # b is gone
    assert (t.followed, t.moved) == (2, 2)
    assert t.choose("other", "k1", ["a", "b"], "b", load.get, margin=2) == "b"  # per model


def test_the_table_forgets_the_least_recent_conversation() -> None:
    t = AffinityTable(size=2)
    load = {"a": 0, "b": 0}.get
    t.choose("m", "k1", ["a", "b"], "a", load, 0)
    t.choose("m", "k2", ["a", "b"], "b", load, 0)
    t.choose("m", "k1", ["a", "b"], "b", load, 0)  # k1 used again: k2 is the oldest now
    t.choose("m", "k3", ["a", "b"], "b", load, 0)
    assert len(t) == 2
    assert t.choose("m", "k2", ["a", "b"], "b", load, 0) == "b"  # forgotten: least
    assert t.choose("m", "k3", ["a", "b"], "a", load, 0) == "b"


# -- the daemon's backend: replicas of the real loop, engines as data ----------------------

REPLICAS = """
[daemon]
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]

[models.chat]
source = "/m/chat"
replicas = 2
routing = "%s"
routing_margin = 1
"""


async def _two_replicas(tmp_path: Path, routing: str) -> DataLoop:
    loop = DataLoop(tmp_path, at("2026-03-30T10:00:00"), REPLICAS % routing)
    await loop.settle()
    assert [loop.state(k) for k in ("chat", "chat#1")] == [State.AWAKE, State.AWAKE]
    return loop


async def test_the_backend_sends_each_turn_back_to_its_replica(tmp_path: Path) -> None:
    loop = await _two_replicas(tmp_path, "prefix")
    first = {c: loop.serving_upstream("chat", affinity=c) for c in ("a", "b")}
    assert first["a"] != first["b"]  # first turns: least outstanding
    for url in first.values():
        loop.upstream_released("chat", url)
    for _ in range(5):  # later turns: back where they went, one at a time or together
        turns = {c: loop.serving_upstream("chat", affinity=c) for c in ("a", "b")}
        assert turns == first
        for url in turns.values():
            loop.upstream_released("chat", url)


async def test_a_busy_replica_hands_its_conversation_over(tmp_path: Path) -> None:
    loop = await _two_replicas(tmp_path, "prefix")
    home = loop.serving_upstream("chat", affinity="a")
    assert home is not None
    other = next(i.base_url for i in loop.instances.values() if i.base_url != home)
    # one more outstanding than the other replica is within the margin of 1: still home;
    # two more is not: the least outstanding replica takes the turn (and the conversation)
    busy = [loop.serving_upstream("chat", affinity="a") for _ in range(2)]
    assert busy == [home, other]
    assert loop.affinity.moved == 1
    assert loop.serving_upstream("chat", affinity="a") == other


async def test_without_prefix_routing_turns_take_turns(tmp_path: Path) -> None:
    loop = await _two_replicas(tmp_path, "least-outstanding")
    routes = loop.routes()
    assert not routes["chat"].prefix_routing
    urls = set()
    for _ in range(4):
        url = loop.serving_upstream("chat")
        assert url is not None
        urls.add(url)
        loop.upstream_released("chat", url)
    assert len(urls) == 2
