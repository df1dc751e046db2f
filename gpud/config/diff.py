"""What a reload asks of the engines, in words for the log: which models go, which restart.

An operator whose model disappeared must find the reload that did it. Pure: compares two
validated configs, never looks at engines.
"""

from __future__ import annotations

from gpud.config.schema import GpudConfig

# Fields that change the engine process itself (a restart), not only how gpud treats it.
_ENGINE_FIELDS = ("source", "engine", "gpu", "gpus", "max_model_len", "kv_cache", "kv_min",
                  "kv_max", "kv_pool", "gpu_memory_utilization", "args", "env", "port",
                  "sleep_level")


def reload_effects(old: GpudConfig, new: GpudConfig) -> list[str]:
    """One line per model the new file removes, unloads or restarts."""
    lines = [f"model {name!r} removed from the file: its engines stop"
             for name in sorted(set(old.models) - set(new.models))]
    for name in sorted(set(old.models) & set(new.models)):
        before, after = old.models[name], new.models[name]
        if after.state == "unloaded" and before.state != "unloaded":
            lines.append(f"model {name!r} state {before.state} -> unloaded: its engines stop")
        elif after.replicas < before.replicas:
            lines.append(f"model {name!r} replicas {before.replicas} -> {after.replicas}: "
                         f"{before.replicas - after.replicas} engine(s) stop")
        changed = [f for f in _ENGINE_FIELDS if getattr(before, f) != getattr(after, f)]
        if changed and after.state != "unloaded":
            lines.append(f"model {name!r} changed ({', '.join(changed)}): its engines restart")
    for kind in sorted(set(old.engines) & set(new.engines)):
        if old.engines[kind] != new.engines[kind]:
            users = sorted(n for n, m in new.models.items() if m.engine == kind
                           and n in old.models and m.state != "unloaded")
            if users:
                lines.append(f"engine kind {kind!r} changed: engines of "
                             f"{', '.join(users)} restart")
    return lines

