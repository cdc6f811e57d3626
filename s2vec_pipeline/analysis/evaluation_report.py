"""What an evaluation measured: metrics per (target, protocol, method) and fold, as a plain-text
table for people, Markdown for Dagster, and strict JSON with every fold's numbers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s2vec_pipeline.storage import fs

PROTOCOLS = ("random", "spatial")


@dataclass
class MethodResult:
    """One (target, protocol, method): metrics per fold and their mean / std over folds."""

    target: str
    protocol: str
    method: str
    n_features: int
    folds: list[dict[str, float | int | None]]

    def stat(self, metric: str) -> tuple[float, float]:
        """(mean, standard deviation) over the folds where the metric is defined."""
        vals = np.array([f[metric] for f in self.folds], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if len(vals) == 0:
            return float("nan"), float("nan")
        return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "target": self.target,
            "protocol": self.protocol,
            "method": self.method,
            "n_features": self.n_features,
        }
        for m in ("r2", "mae", "rmse"):
            mean, std = self.stat(m)
            d[m] = {"mean": mean, "std": std}
        d["folds"] = self.folds
        return d


@dataclass
class EvaluationReport:
    """Everything ``evaluate`` measured; ``table()`` for people, ``to_dict()`` for JSON."""

    root: str
    model_version: str
    pixel_level: int
    block_level: int
    n_rows: int
    targets: list[str]
    methods: list[str]
    folds: dict[str, int]
    n_blocks: int
    embedding_dim: int
    n_channels: int
    seed: int
    results: list[MethodResult] = field(default_factory=list)
    fold_of_row: dict[str, list[int]] = field(default_factory=dict, repr=False)
    notes: list[str] = field(default_factory=list)
    unit: str = "cell"  # what a label row is: a pixel "cell" or an "area" (polygon)

    def result(self, target: str, protocol: str, method: str) -> MethodResult:
        for r in self.results:
            if (r.target, r.protocol, r.method) == (target, protocol, method):
                return r
        raise KeyError((target, protocol, method))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = [r.summary() for r in self.results]
        return d

    def to_json(self) -> str:
        """Strict JSON: undefined values (NaN R² of a one-row fold) become null."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not np.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return json.dumps(clean(self.to_dict()), indent=2, allow_nan=False)

    def _rows(self) -> list[tuple[str, str, list[list[str]]]]:
        out = []
        for target in self.targets:
            for protocol in PROTOCOLS:
                res = [r for r in self.results if r.target == target and r.protocol == protocol]
                if not res:
                    continue
                scored = [r for r in res if np.isfinite(r.stat("r2")[0])]
                best = max(scored, key=lambda r: r.stat("r2")[0]).method if scored else None
                rows = []
                for r in res:
                    cells = [r.method + (" *" if r.method == best else ""), str(r.n_features)]
                    for m in ("r2", "mae", "rmse"):
                        mean, std = r.stat(m)
                        cells.append(f"{mean:.3f} ± {std:.3f}")
                    rows.append(cells)
                out.append((target, protocol, rows))
        return out

    def _protocol_title(self, protocol: str) -> str:
        k = self.folds[protocol]
        if protocol == "random":
            return f"random {k}-fold"
        return f"spatial {k}-fold, whole level-{self.block_level} cells held out"

    def table(self) -> str:
        """A plain-text table per target and protocol (* = best mean R²)."""
        head = ["method", "features", "R²", "MAE", "RMSE"]
        lines = [
            f"model {self.model_version}: {self.n_rows} labelled {self.unit}s (level "
            f"{self.pixel_level} pixels), {self.n_blocks} level-{self.block_level} blocks; "
            f"mean ± std over folds"
        ]
        for target, protocol, rows in self._rows():
            widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
            lines.append("")
            lines.append(f"{target} — {self._protocol_title(protocol)}")
            fmt = [str.ljust, str.rjust, str.rjust, str.rjust, str.rjust]
            for r in [head, *rows]:
                lines.append(
                    "  ".join(f(c, w) for f, c, w in zip(fmt, r, widths, strict=True)).rstrip()
                )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The same tables as Markdown (for Dagster metadata)."""
        lines = [
            f"Model `{self.model_version}`, {self.n_rows} labelled {self.unit}s, mean ± std over "
            "folds"
            " (**bold** = best mean R²)."
        ]
        for target, protocol, rows in self._rows():
            lines += [
                "",
                f"**{target}**, {self._protocol_title(protocol)}",
                "",
                "| method | features | R² | MAE | RMSE |",
                "|---|---:|---:|---:|---:|",
            ]
            for r in rows:
                name = f"**{r[0][:-2]}**" if r[0].endswith(" *") else r[0]
                lines.append(f"| {name} | {' | '.join(r[1:])} |")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def write_report(report: EvaluationReport, path: str | os.PathLike) -> None:
    """JSON with every fold's numbers (written whole, then renamed into place)."""
    fs.write_text(Path(path), report.to_json())
