"""The policies' round: every `interval`, reload the scripts, evaluate them on the loop's
view (off the loop, in a thread), hand their intents to the loop, and log a policy that gets
disabled once. A change of the `[policies]` table starts a fresh runner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpud.config import GpudConfig
    from gpud.events import EventBus
    from gpud.reconcile import Reconciler

log = logging.getLogger("gpud.daemon")


async def run_policies(reconciler: Reconciler, events: EventBus,
                       config: Callable[[], GpudConfig]) -> None:
    from gpud.policies.runner import PolicyRunner

    while True:
        pcfg = config().policies
        if not pcfg.enabled or not pcfg.dir.is_dir():
            reconciler.set_policy_status([])
            reconciler.set_policy_intents([])
            await asyncio.sleep(pcfg.interval.total_seconds())
            continue
        runner = PolicyRunner(pcfg.dir, timeout=pcfg.timeout.total_seconds())
        try:
            while config().policies == pcfg:
                try:
                    await policy_round(reconciler, events, runner)
                except Exception:  # the runner's own bug: next round, not a dead loop
                    log.exception("policy round failed; trying again in %s", pcfg.interval)
                await asyncio.sleep(pcfg.interval.total_seconds())
        finally:
            await asyncio.to_thread(runner.close)


async def policy_round(reconciler: Reconciler, events: EventBus, runner: Any) -> None:
    await asyncio.to_thread(runner.reload)
    view = reconciler.policy_view()
    intents, statuses = await asyncio.to_thread(runner.evaluate, view)
    before = {p["name"]: p.get("error") for p in reconciler.policy_status}
    reconciler.set_policy_status([st.as_dict() for st in statuses])
    for st in reconciler.policy_status:
        if st.get("error") and before.get(st["name"]) != st["error"]:
            log.error("policy %s disabled: %s", st["name"], st["error"])
            events.publish("policy", policy=st["name"], error=st["error"])
    reconciler.set_policy_intents(intents)
