"""``SBoRAConfig``: the hyper-parameters of one SBoRA adapter, frozen and validated.

Target matching follows PEFT: a list of names matches a module whose (normalised) name equals an
entry or ends with ``"." + entry``; a single string is a regular expression that must match the
whole name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from sbora_reg.errors import ConfigError

VARIANTS = ("fa", "fb")


@dataclass(frozen=True)
class SBoRAConfig:
    """One SBoRA adapter's settings.

    ``variant``: ``"fa"`` trains ``B`` (out, r) on r input columns; ``"fb"`` trains ``A`` (r, in)
    on r output rows. ``r``: number of columns/rows per module. ``alpha``: the update is scaled by
    ``alpha / r``. ``target_modules``: names (suffix match) or one full-match regex.
    ``dropout``: on the adapter path only. ``seed``: drives the default index choice.
    """

    variant: str = "fa"
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be 'fa' or 'fb', not {self.variant!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r must be a positive integer, not {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ConfigError(f"alpha must be a number, not {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            raise ConfigError(f"alpha must be finite and non-zero, not {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ConfigError(f"dropout must be a number in [0, 1), not {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")
        object.__setattr__(self, "target_modules", _check_targets(self.target_modules))

    @property
    def scale(self) -> float:
        """The factor ``s = alpha / r`` in ``ΔW = s·B·A``."""
        return self.alpha / self.r

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` (base-model name) is a target."""
        targets = self.target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``target_modules`` as a list, or the regex string)."""
        d = asdict(self)
        if not isinstance(self.target_modules, str):
            d["target_modules"] = list(self.target_modules)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> SBoRAConfig:
        """Build from a dict holding exactly the config fields (unknown keys are refused)."""
        if not isinstance(data, dict):
            raise ConfigError(f"an SBoRA config must be a JSON object, not {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown SBoRA config keys {unknown}; expected some of {sorted(names)}"
            )
        targets = data.get("target_modules")
        if isinstance(targets, list):
            data = {**data, "target_modules": tuple(targets)}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SBoRAConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the SBoRA config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _check_targets(targets: Any) -> tuple[str, ...] | str:
    if isinstance(targets, str):
        if not targets:
            raise ConfigError("target_modules must not be empty")
        try:
            re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"target_modules regex {targets!r} is invalid: {exc}") from exc
        return targets
    if not isinstance(targets, list | tuple) or not targets:
        raise ConfigError("target_modules must be a non-empty list of module names or a regex")
    if not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"target_modules entries must be non-empty strings, got {targets!r}")
    return tuple(targets)
