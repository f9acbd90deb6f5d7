"""Evaluation records and their statistics: a :class:`Metric` (value, n, 95% CI, settings, seconds), an
:class:`EvalReport` of them, Wilson and bootstrap intervals."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import atomic


Z95 = 1.959963984540054


@dataclass
class Metric:
    name: str
    value: float
    n: int
    ci: tuple[float, float]
    higher_is_better: bool | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    per_item: list | None = field(default=None, repr=False)  # kept in memory for paired analyses; not serialized

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("per_item")
        d["ci"] = [float(self.ci[0]), float(self.ci[1])]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Metric":
        return cls(**{**d, "ci": tuple(d["ci"])})

    def __str__(self) -> str:
        return f"{self.name} = {self.value:.4g} [{self.ci[0]:.4g}, {self.ci[1]:.4g}] (n={self.n}, {self.seconds:.1f} s)"


@dataclass
class EvalReport:
    model: str
    profile: str
    metrics: dict[str, Metric]
    seconds: float
    settings: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> Metric:
        return self.metrics[name]

    def to_dict(self) -> dict:
        return {"model": self.model, "profile": self.profile, "seconds": round(self.seconds, 2),
                "settings": self.settings, "metrics": {k: m.to_dict() for k, m in self.metrics.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalReport":
        return cls(d["model"], d["profile"], {k: Metric.from_dict(m) for k, m in d["metrics"].items()}, d["seconds"],
                   d.get("settings", {}))

    def save(self, path: str | Path) -> Path:
        return atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "EvalReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        rows = [f"| metric | value | 95% CI | n | seconds |", "|---|---|---|---|---|"]
        for m in self.metrics.values():
            rows.append(f"| {m.name} | {m.value:.4g} | [{m.ci[0]:.4g}, {m.ci[1]:.4g}] | {m.n} | {m.seconds:.1f} |")
        return "\n".join(rows)


# confidence intervals

def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap over item indices: ``stat(idx)`` recomputes the statistic on resampled items."""
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    vals = vals[np.isfinite(vals)]
    return (float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2)))


def proportion(name: str, flags: Sequence[bool], higher_is_better: bool | None, settings: dict, t0: float,
               details: dict | None = None) -> Metric:
    k, n = int(sum(flags)), len(flags)
    return Metric(name, k / n if n else float("nan"), n, wilson(k, n), higher_is_better, settings,
                  round(time.time() - t0, 2), details or {}, [bool(f) for f in flags])
