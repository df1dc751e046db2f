"""Make room on a GPU: sleep the lowest-priority idle models so a more important one can wake.

A model "must wake" when it is asleep and either the file/profile wants it awake or
requests are queued for it. If waking it would not fit in its GPUs' free memory, this
policy puts idle (nothing in flight or queued), lower-priority, awake models on the same
GPUs to sleep, lowest priority first and longest idle first among equals, until it fits.
When even all of them would not make enough room, it sleeps none: disturbing models for
nothing helps nobody. Memory figures are the estimates gpud puts in the view.
"""

from __future__ import annotations

from gpud.policies.api import Intent, ModelView, Sleep, View

GIB = 1 << 30


def decide(view: View) -> list[Intent]:
    free = {gpu.index: gpu.free_bytes for gpu in view.gpus}
    chosen: dict[str, Sleep] = {}
    wakers = [m for m in view.models if m.state == "asleep" and _wants_to_wake(m)]
    for waker in sorted(wakers, key=lambda m: (-m.priority, m.name)):
        need = max(waker.awake_gpu_bytes - waker.gpu_bytes, 0)
        short = {g: need - free.get(g, 0) for g in waker.gpus if need > free.get(g, 0)}
        if not short:
            continue
        victims = sorted(
            (
                m
                for m in view.models
                if m.state == "awake"
                and not m.busy
                and m.priority < waker.priority
                and m.name not in chosen
                and set(m.gpus) & set(short)
            ),
            key=lambda m: (m.priority, -m.idle_seconds, m.name),
        )
        picked: list[ModelView] = []
        for victim in victims:
            if all(amount <= 0 for amount in short.values()):
                break
            if not any(short.get(g, 0) > 0 for g in victim.gpus):
                continue  # it only frees memory on GPUs that already have room
            picked.append(victim)
            for g in victim.gpus:
                if g in short:
                    short[g] -= victim.gpu_bytes
        if any(amount > 0 for amount in short.values()):
            continue  # not enough even with all of them asleep: disturb nobody
        for victim in picked:
            for g in victim.gpus:
                free[g] = free.get(g, 0) + victim.gpu_bytes
            chosen[victim.name] = Sleep(
                victim.name,
                victim.sleep_level,
                f"make room for {waker.name} (priority {waker.priority} > {victim.priority}): "
                f"it needs {need / GIB:.1f} GiB on GPU {_gpus(waker)}",
            )
        for g in waker.gpus:
            free[g] = free.get(g, 0) - need
    return list(chosen.values())


def _wants_to_wake(model: ModelView) -> bool:
    return model.desired == "awake" or model.queued > 0


def _gpus(model: ModelView) -> str:
    return ",".join(str(g) for g in model.gpus)
