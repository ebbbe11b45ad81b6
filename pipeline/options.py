"""Checking a stage's numeric and boolean options at start, so that `concurrency=0` or
`number_sample_per_shard=abc` stop the command in one line instead of hanging a pool or failing in a worker.

`check_options(stage, cfg, SPEC)` with SPEC a tuple of `Option`s: each names a key, its kind (int, number or
bool), its bounds and whether null is allowed. The first bad one raises `StageError` naming the key, the value
and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import StageError


@dataclass(frozen=True)
class Option:
    key: str  # dotted for nested keys: "ray.num_cpus"
    kind: type = int  # int, float (any number) or bool
    low: float | None = None
    high: float | None = None
    nullable: bool = False

    def expected(self) -> str:
        what = {int: "an integer", float: "a number", bool: "true or false"}[self.kind]
        if self.low is not None and self.high is not None:
            what += f" from {self.low:g} to {self.high:g}"
        elif self.low is not None:
            what += f" ≥ {self.low:g}"
        return what + (", or null" if self.nullable else "")

    def valid(self, value) -> bool:
        if value is None:
            return self.nullable
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


def _lookup(cfg: dict, key: str):
    value = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def check_options(stage: str, cfg: dict, spec: tuple[Option, ...]) -> None:
    for option in spec:
        value = _lookup(cfg, option.key)
        if value is _MISSING:
            continue  # absent keys take the code's defaults
        if not option.valid(value):
            raise StageError(f"{stage}: {option.key}={value!r}; expected {option.expected()}")


COUNT = {"kind": int, "low": 1}  # a positive count: shards, actors, threads, bytes
RAY = Option("ray.num_cpus", nullable=True, **COUNT)
STAGE_FLAGS = tuple(Option(k, bool) for k in ("overwrite", "wait_for_lock", "progress"))
