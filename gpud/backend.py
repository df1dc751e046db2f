"""The proxy's backend (gpud.proxy.api.Backend): routes, the upstream a request goes to,
wake-on-request (the fast path `_wake_now` and the early send), balancing over replicas and
draining. Requests never change an instance's state here except by starting a wake action.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from gpud.config.rules import RulesConfig
from gpud.desired import (
    Override,
)
from gpud.engines.vllm import (
    max_num_seqs,
)
from gpud.instance import (
    Instance,
    LoopState,
    ModelTraffic,
)
from gpud.plan import Action, Plan
from gpud.proxy.api import ModelRoute, ModelUnavailable
from gpud.proxy.rules import RequestRules
from gpud.states import RUNNING, State

log = logging.getLogger("gpud.reconcile")


def request_rules(cfg: RulesConfig | None) -> RequestRules | None:
    """The proxy's form of a model's rules; None when it has none (the untouched path)."""
    if cfg is None or not (cfg.default or cfg.force or cfg.strip or cfg.cap):
        return None
    return RequestRules(default=dict(cfg.default), force=dict(cfg.force),
                        strip=tuple(cfg.strip), cap=dict(cfg.cap))


class ProxyBackend(LoopState):
    """The reconciler as the proxy's backend."""

    def routes(self) -> Mapping[str, ModelRoute]:
        key = (self.loaded.revision, tuple((k, i.state) for k, i in self.instances.items()))
        if key != self._routes_key:
            self._routes = {
                name: ModelRoute(
                    name=name, aliases=tuple(m.aliases),
                    max_concurrency=m.max_concurrency or max_num_seqs(m.args),
                    max_queue=m.max_queue, request_timeout=m.request_timeout.total_seconds(),
                    load_on_demand=m.load_on_demand,
                    stream_keepalive=m.stream_keepalive.total_seconds(),
                    state=self.instances[name].state if name in self.instances else State.UNLOADED,
                    rules=request_rules(m.rules), prefix_routing=m.routing == "prefix",
                )
                for name, m in self.config.models.items()
            }
            self._routes_key = key
        return self._routes

    def _serving(self, model: str) -> list[Instance]:
        # `awake` is cleared during the warm-up sleep/wake after a load: the state says
        # "awake" then, but the engine is asleep for a moment and must not get requests.
        # A moving engine serves from its old place until the new one takes over.
        return [i for i in self.instances.values()
                if i.model == model and i.port and (
                    (i.state == State.AWAKE and i.awake.is_set()) or i.state == State.MOVING)]

    def serving_upstream(self, model: str, affinity: str | None = None) -> str | None:
        ready = self._serving(model)
        return self._pick(model, ready, affinity) if ready else None

    async def ready_upstream(self, model: str) -> str:
        base = self.serving_upstream(model)
        if base is not None:
            return base
        await self._wake_flight.run(model, lambda: self._bring_up(model))
        ready = self._serving(model)
        if not ready:
            raise ModelUnavailable(f"model {model!r} is not ready", retry_after=5)
        return self._pick(model, ready)

    def _pick(self, model: str, ready: list[Instance], affinity: str | None = None) -> str:
        # Least outstanding requests across replicas; ties take turns (round robin), so
        # requests that come one at a time still spread over every replica. A conversation
        # under prefix routing goes back where it went before, within the model's margin.
        out = self.outstanding
        turn = self._turns[model] = self._turns.get(model, 0) + 1
        n = len(ready)
        best = min(ready, key=lambda i: (out.get(i.base_url or "", 0),
                                         (i.replica - turn) % n if n > 1 else 0))
        url = best.base_url or ""
        if affinity is not None and n > 1 and (m := self.config.models.get(model)) is not None:
            url = self.affinity.choose(model, affinity, [i.base_url or "" for i in ready], url,
                                       lambda u: out.get(u, 0), m.routing_margin)
        out[url] = out.get(url, 0) + 1
        return url

    def waking_upstreams(self, model: str) -> list[str]:
        insts = [i for i in self.instances.values() if i.model == model]
        if any(i.state == State.AWAKE and i.awake.is_set() for i in insts):
            return []
        return [i.base_url for i in sorted(insts, key=lambda i: i.replica)
                if i.base_url and i.state in (State.ASLEEP, State.WAKING)]

    async def early_upstream(self, model: str) -> str | None:
        """The engine a request may be sent to before its wake ends: asleep (or waking) at
        level 1, with its scheduler paused (`queues_asleep`), so vLLM tokenizes and queues
        the request while the weights come back and schedules it the moment it is awake.
        Returns once the engine was sent its `/wake_up`: on the H100 the request sent
        after the wake gave the first token soonest (bench/gpu `raw_order`), sent before it
        slowed the wake of a 1.8 GB model by ~10%. Not at level 2 (vLLM resumes scheduling
        at `/wake_up`, before `reload_weights`), not for a model an operator holds asleep
        or unloaded, not while any replica serves."""
        inst = self._early_candidate(model)
        if inst is None:
            return None
        await inst.wake_sent.wait()
        return inst.base_url if inst.state in (State.WAKING, State.AWAKE) else None

    def _early_candidate(self, model: str) -> Instance | None:
        insts = [i for i in self.instances.values() if i.model == model]
        if any(i.state == State.AWAKE and i.awake.is_set() for i in insts):
            return None
        if self._held_down(model) is not None:
            return None
        # the engine being woken, else the one `_wake_now` wakes: the first by replica
        inst = min([i for i in insts if i.state == State.WAKING] or insts,
                   key=lambda i: i.replica, default=None)
        if (inst is not None and inst.state in (State.ASLEEP, State.WAKING) and inst.queues_asleep
                and inst.sleep_level == 1 and inst.client is not None and inst.base_url):
            return inst
        return None

    def _held_down(self, model: str) -> Override | None:
        """The operator's override holding `model` asleep or unloaded now, if any."""
        ov = self.overrides.get(model)
        if ov is not None and ov.state in (State.ASLEEP, State.UNLOADED) and ov.active(self.now()):
            return ov
        return None

    def upstream_released(self, model: str, base: str) -> None:
        """The proxy is done with `base`: counts drive balancing and draining."""
        left = self.outstanding.get(base, 0) - 1
        if left > 0:
            self.outstanding[base] = left
        else:
            self.outstanding.pop(base, None)
            drained = self._drained.pop(base, None)
            if drained is not None:
                drained.set()

    async def drain(self, url: str | None, timeout: float) -> bool:
        """Wait until no request is outstanding on `url` (up to `timeout`); True if drained."""
        if not url or not self.outstanding.get(url):
            return True
        event = self._drained.setdefault(url, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _bring_up(self, model: str) -> None:
        m = self.config.models.get(model)
        if m is None:
            raise ModelUnavailable(f"model {model!r} is not configured", code="model_not_found")
        insts = [i for i in self.instances.values() if i.model == model]
        if any(i.state == State.FAILED for i in insts) and not any(
                i.state in RUNNING | {State.STARTING, State.WAKING} for i in insts):
            reason = next(i.reason for i in insts if i.state == State.FAILED)
            raise ModelUnavailable(f"model {model!r} has failed: {reason}", retry_after=30)
        loaded = any(i.state not in (State.UNLOADED, State.FAILED) for i in insts)
        restarting = self._restarting(insts) if not loaded else []
        if restarting:
            # A crash backoff: the loop starts the engine again by itself when it ends.
            wait = max(1.0, min(i.retry_at for i in restarting) - self._mono())
            raise ModelUnavailable(
                f"model {model!r} is restarting after its engine stopped "
                f"({restarting[0].last_error or restarting[0].reason}); next start in "
                f"{wait:.0f}s", retry_after=wait + 1, code="model_restarting")
        if not loaded and not m.load_on_demand:
            raise ModelUnavailable(
                f"model {model!r} is unloaded and does not allow load_on_demand", retry_after=60,
                code="model_unloaded")
        ov = self._held_down(model)
        if ov is not None:
            raise ModelUnavailable(f"model {model!r} is held {ov.state} by an operator "
                                   f"({ov.reason})", retry_after=60, code="model_held")
        self.demand[model] = self._mono()
        self.events.publish("demand", model=model, reason="woken by a request")
        if not self._wake_now(model):
            self._urgent = True
            self.trigger()
        while not self._serving(model):
            insts = [i for i in self.instances.values() if i.model == model]
            waiters: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(i.changed.wait()) for i in insts
            ] or [asyncio.ensure_future(asyncio.sleep(0.05))]
            _, pending = await asyncio.wait(waiters, timeout=1.0,
                                            return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            failed = [i for i in insts if i.state == State.FAILED]
            if failed and not self._serving(model):
                raise ModelUnavailable(f"model {model!r} failed: {failed[0].reason}",
                                       retry_after=30)

    def _restarting(self, insts: list[Instance]) -> list[Instance]:
        """The instances waiting out a crash backoff that the loop will start again."""
        if not any(i.state == State.UNLOADED and (i.retry_at > self._mono()
                                                  or i.backoff.consecutive) for i in insts):
            return []
        desired = self.desired()
        return [i for i in insts if i.state == State.UNLOADED and (
            i.retry_at > self._mono() or i.backoff.consecutive) and not i.backoff.failed
            and (d := desired.get(i.key)) is not None and d.state != State.UNLOADED]

    def _wake_now(self, model: str) -> bool:
        """Wake-on-request's fast path: start the wake here, not a loop pass later.

        Only for a sleeping engine with nothing under way, and only when the fit check
        lets the wake run alone (no other model must sleep first); otherwise the pass does it.
        """
        insts = sorted((i for i in self.instances.values() if i.model == model),
                       key=lambda i: i.replica)
        inst = next((i for i in insts if i.state == State.ASLEEP and i.client is not None
                     and i.key not in self._tasks), None)
        if inst is None:
            return False
        desired = self.desired()
        d = desired.get(inst.key)
        if d is None or d.state != State.AWAKE:
            return False
        action = Action("wake", inst.key, d.reason, inst.gpu)
        fitted = self._fit(Plan((action,)), desired, self.observed())
        if fitted.actions != (action,):
            return False
        inst.state_before = inst.state
        inst.change_state(State.WAKING, d.reason)
        self._tasks[inst.key] = asyncio.create_task(self._run_chain(inst, [action], d))
        return True

    def request_started(self, model: str) -> None:
        t = self.traffic.setdefault(model, ModelTraffic())
        t.inflight += 1
        t.requests += 1
        t.last_request = self._mono()

    def request_finished(self, model: str) -> None:
        t = self.traffic.setdefault(model, ModelTraffic())
        t.inflight = max(0, t.inflight - 1)
        t.last_request = self._mono()
