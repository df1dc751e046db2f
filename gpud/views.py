"""Read-only views of the loop for status and policies, and the footprint books of the fit
check (measured footprints written to the state directory, estimates read once per spec).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from gpud.desired import (
    DesiredModel,
    Layers,
    effective,
)
from gpud.fit import FitResult, Footprint, fit, measured_footprint
from gpud.footprints import FootprintStore, estimate_for
from gpud.instance import (
    Instance,
    LoopState,
    ModelTraffic,
)
from gpud.plan import ObservedModel, Plan
from gpud.states import RUNNING, State

log = logging.getLogger("gpud.reconcile")


class Views(LoopState):
    """Status and policy views, and footprint books."""

    def policy_view(self) -> Any:
        """The read-only snapshot a policy decides on."""
        from gpud.policies.api import ModelView, View

        now = self.now()
        profile, _ = self.active_profile(now)
        base = effective(self.config, Layers(profile=profile), now)
        mono = self._mono()
        views = []
        for key, d in base.items():
            if d.replica:
                continue
            inst = self.instances.get(key)
            m = self.config.models[d.model]
            t = self.traffic.get(d.model)
            idle = mono - t.last_request if t and t.last_request and not t.inflight else 0.0
            views.append(ModelView(
                name=d.model, state=inst.state if inst else State.UNLOADED,
                desired=d.state,  # type: ignore[arg-type]
                priority=d.priority, gpus=() if d.gpu is None else (d.gpu,),
                sleep_level=d.sleep_level, idle_seconds=idle,
                in_flight=t.inflight if t else 0,
                idle_sleep_after=m.idle_sleep_after.total_seconds() if m.idle_sleep_after else None,
                kv_budget_bytes=m.kv_cache if m.kv_cache is not None else m.kv_max,
            ))
        return View(now=now, active_profile=profile, models=tuple(views))

    def model_status(self, key: str, desired: Mapping[str, DesiredModel],
                     notes: Mapping[str, str]) -> dict[str, Any]:
        inst = self.instances.get(key) or Instance(key, key.split("#")[0])
        d = desired.get(key)
        t = self.traffic.get(inst.model, ModelTraffic())
        reason = inst.reason or (d.reason if d else "")
        if inst.key in notes and inst.state != State.AWAKE:
            reason = notes[inst.key]
        elif d is not None and inst.state in RUNNING and inst.state == d.state:
            reason = d.reason
        m = self.config.models.get(inst.model)
        idle = round(self._mono() - t.last_request, 1) if t.last_request else None
        return {
            "state": inst.state,
            "desired": d.state if d else State.UNLOADED,
            "reason": reason,
            **self._progress(inst),
            **_behaviour(m, d, inst.state, _quiet(t, self._mono(), inst.state_since)),
            "pid": inst.proc.pid if inst.proc else None,
            "port": inst.port,
            "gpu": inst.gpu if inst.gpu is not None else (d.gpu if d else None),
            "restarts": inst.restarts,
            "model": inst.model,
            "replica": inst.replica,
            "layer": d.layer if d else None,
            "inflight": t.inflight,
            "idle_seconds": idle,
            "last_error": inst.last_error,
            "state_since": datetime.fromtimestamp(inst.state_since).isoformat(timespec="seconds"),
            "uptime_seconds": round(time.time() - inst.started_at, 1) if inst.started_at
            and inst.proc else None,
            "spec_hash": inst.spec_hash,
        }

    def _progress(self, inst: Instance) -> dict[str, Any]:
        """How long this state has lasted; while starting, the load's phase and its time,
        the phases before and the engine's last log line."""
        now = time.time()
        out: dict[str, Any] = {"state_seconds": round(max(0.0, now - inst.state_since), 1),
                               "phase": None, "phase_seconds": None}
        load = inst.load
        if inst.state == State.STARTING and load is not None:
            in_phase, _ = load.elapsed(now)
            out.update(phase=load.phase, phase_seconds=round(in_phase, 1),
                       phases=[{"phase": p, "seconds": s} for p, s in load.done])
            tail = inst.proc.log_tail(1) if inst.proc is not None else []
            if tail:
                out["log_line"] = tail[0][-300:]
        return out

    def status_models(self) -> dict[str, dict[str, Any]]:
        now = self.now()
        layers, notes = self.layers(now)
        desired = effective(self.config, layers, now)
        keys = sorted(set(desired) | set(self.instances))
        return {k: self.model_status(k, desired, notes) for k in keys}

    def _footprints(self, desired: Mapping[str, DesiredModel]) -> dict[str, Footprint]:
        """Each instance's footprint for the fit check: measured where gpud saw the engine
        run, else estimated from the model's config.json (read once per spec)."""
        fps: dict[str, Footprint] = {}
        for key, d in desired.items():
            if d.gpu is None:
                continue
            m = self.config.models[d.model]
            cache_key = FootprintStore.key(d.model, d.gpu, d.spec_hash)
            if cache_key not in self._estimates:
                total = self.gpus[d.gpu].total if d.gpu in self.gpus else None
                self._estimates[cache_key] = estimate_for(self.config, d.model, total)
            fp = self.footprints.best(cache_key, self._estimates[cache_key])
            if fp is not None:
                if not self.config.engines[m.engine].sleep_mode:
                    fp = replace(fp, sleeping=fp.awake)  # no sleep mode: a sleep frees nothing
                fps[key] = fp
        return fps

    def _fit(self, result: Plan, desired: Mapping[str, DesiredModel],
             observed: Mapping[str, ObservedModel]) -> FitResult:
        """The fit check of one action outside a pass (wake-on-request's fast path)."""
        if not self.gpus:
            return FitResult(result.actions)
        mono = self._mono()
        busy = {k for k, i in self.instances.items()
                if (t := self.traffic.get(i.model)) is not None and t.inflight}
        idle = {k: mono - t.last_request for k, i in self.instances.items()
                if (t := self.traffic.get(i.model)) is not None and t.last_request}
        return fit(result, desired, observed, self.gpus, self._footprints(desired),
                   self.config.daemon.gpu_headroom, busy, idle=idle)

    def record_footprints(self, per_key: Mapping[str, int]) -> None:
        """Remember what settled engines really take (NVML), for later fit checks."""
        if not self.gpus:
            return
        for key, used in per_key.items():
            inst = self.instances.get(key)
            if inst is None or inst.spec_hash is None or inst.key in self._tasks:
                continue
            m = self.config.models.get(inst.model)
            if m is None or inst.state not in RUNNING:
                continue
            kv = m.kv_cache if m.kv_cache is not None else (m.kv_max or 0)
            fkey = FootprintStore.key(inst.model, inst.gpu, inst.spec_hash)
            old = self.footprints.get(fkey)
            if inst.state == State.AWAKE:
                asleep = old.sleeping if old is not None else None
                new = measured_footprint(used, kv, asleep=asleep)
            elif old is not None and old.source == "measured":
                new = replace(old, sleeping=used)
            else:
                continue
            if old != new:
                self.footprints.record(fkey, new)


def _quiet(t: ModelTraffic, mono: float, state_since: float) -> float:
    """Seconds without a request since the model woke (desired.quiet_for's reading)."""
    if t.inflight:
        return 0.0
    awake_for = max(0.0, time.time() - state_since)
    return min(awake_for, mono - t.last_request) if t.last_request else awake_for


def _behaviour(m: Any, d: DesiredModel | None, state: State, idle: float
               ) -> dict[str, Any]:
    """What explains what gpud does with a model besides its state: may a request load it,
    is it kept awake, its priority, and when it sleeps for lack of requests."""
    if m is None:
        return {"load_on_demand": False, "pinned": False, "priority": 0,
                "idle_sleep_after": None, "idle_sleep_in": None, "rules": [],
                "routing": "least-outstanding"}
    after = m.idle_sleep_after.total_seconds() if m.idle_sleep_after else None
    sleep_in = None
    if after is not None and state == State.AWAKE and (d is None or d.layer != "override"):
        sleep_in = round(max(0.0, after - idle), 1)
    return {"load_on_demand": m.load_on_demand, "pinned": m.pinned,
            "priority": d.priority if d is not None else m.priority,
            "idle_sleep_after": after, "idle_sleep_in": sleep_in,
            "rules": m.rules.describe() if m.rules is not None else [],
            "routing": m.routing}
