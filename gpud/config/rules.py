"""The schema of a model's request rules (`[models.NAME.rules]`): what `gpud check`
accepts, with errors that name the key.

Kept apart from schema.py so the proxy's rules (gpud.proxy.rules) and their config read
side by side. Pure: validation only.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

MAX_RULES = 64
# Keys gpud itself reads to route the request: a rule on them would route one model's
# request to another (or nowhere).
ROUTING_KEYS = frozenset({"model"})
RuleKey = Annotated[str, Field(min_length=1, max_length=256)]


class RulesConfig(BaseModel):
    """Request rules of one model, applied by the proxy before the engine sees a request.

    default: values set when the client sent none; force: values always set; strip: keys
    removed; cap: numbers clamped (e.g. `max_tokens = 512`; set to the cap when absent).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    default: dict[RuleKey, JsonValue] = Field(default_factory=dict, max_length=MAX_RULES)
    force: dict[RuleKey, JsonValue] = Field(default_factory=dict, max_length=MAX_RULES)
    strip: list[RuleKey] = Field(default_factory=list, max_length=MAX_RULES)
    cap: dict[RuleKey, float] = Field(default_factory=dict, max_length=MAX_RULES)

    @field_validator("default", "force", "strip", "cap")
    @classmethod
    def _not_routing(cls, value: Any) -> Any:
        for key in value:
            if key in ROUTING_KEYS:
                raise ValueError(f"{key!r} names the model gpud routes by; no rule may change it")
        return value

    @field_validator("cap", mode="before")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        for key, limit in value.items() if isinstance(value, dict) else ():
            if (isinstance(limit, bool) or not isinstance(limit, int | float)
                    or not math.isfinite(limit) or limit <= 0):
                raise ValueError(f"the cap of {key!r} must be a number above 0, not {limit!r}")
        return value

    @model_validator(mode="after")
    def _no_overlap(self) -> RulesConfig:
        kinds = {"default": set(self.default), "force": set(self.force),
                 "strip": set(self.strip), "cap": set(self.cap)}
        names = list(kinds)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = sorted(kinds[a] & kinds[b])
                if both and {a, b} != {"default", "cap"}:
                    raise ValueError(f"{', '.join(both)} is both in {a} and in {b}: "
                                     "give each key one rule")
        return self

    def describe(self) -> list[str]:
        """One line per rule, for the plan, the status API and the page."""
        lines = [f"default {k} = {json.dumps(v)}" for k, v in self.default.items()]
        lines += [f"force {k} = {json.dumps(v)}" for k, v in self.force.items()]
        lines += [f"strip {k}" for k in self.strip]
        lines += [f"cap {k} <= {v:g}" for k, v in self.cap.items()]
        return lines
