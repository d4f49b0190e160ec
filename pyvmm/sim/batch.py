"""`pyvmm sim batch`: named comparisons in simulation, one report per run and seed, then
the bench's own tables and charts (pyvmm/bench/batch.py's `tables` and `charts`)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyvmm.bench import report
from pyvmm.bench.batch import charts, select, tables
from pyvmm.bench.comparisons import Comparison
from pyvmm.sim.comparisons import COMPARISONS, MODEL_DEFAULTS, SEEDS
from pyvmm.sim.engine import simulate
from pyvmm.sim.model import SimModel


@dataclass
class SimBatchOptions:
    names: list[str]
    model: dict[str, Any] = field(default_factory=dict)  # SimModel fields set by the user
    output: Path | None = None  # reports, table.md and charts per comparison
    seeds: int | None = None  # default: SEEDS[comparison] or 1
    filter: str = "*"
    charts: bool = True


@dataclass
class SimResult:
    comparison: Comparison
    reports: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""  # the tables, Markdown
    charts: list[Path] = field(default_factory=list)


def selected(names: list[str]) -> list[Comparison]:
    return select(names, COMPARISONS)


def run_batch(opts: SimBatchOptions, say: Callable[[str], None]) -> list[SimResult]:
    """Every selected run once per seed (seed k: SimModel.seed + k); the model is the
    comparison's (MODEL_DEFAULTS) with the user's fields over it. Each report is written to
    OUTPUT/COMPARISON/NAME-SEED.json when asked."""
    results = []
    for comp in selected(opts.names):
        res = SimResult(comp)
        base = SimModel(**{**MODEL_DEFAULTS.get(comp.name, {}), **opts.model})
        seeds = opts.seeds or SEEDS.get(comp.name, 1)
        for scenario, hw in comp.runs:
            if not fnmatch.fnmatch(f"{comp.name}/{scenario.name}", opts.filter):
                continue
            for k in range(seeds):
                model = replace(base, seed=base.seed + k)
                rpt = simulate(scenario, hw, model)
                res.reports.append(rpt)
                r = rpt["result"]
                say(
                    f"{comp.name}/{scenario.name} seed {model.seed}: {r['status']} "
                    f"{r['total_time'] / 1000:.1f} s, downtime {r['downtime']} ms, "
                    f"{r['dirty_syncs']} syncs, {r['iteration_count']} iterations, max "
                    f"throttle {r['max_throttle_pcent']}% ({rpt['simulation']['wall_s']:.2f} s)"
                )
                if opts.output is not None:
                    path = opts.output / comp.name / f"{scenario.name}-{model.seed}.json"
                    report.write(rpt, path)
        if res.reports:
            res.text = tables(comp, res.reports)
            if opts.output is not None:
                out_dir = opts.output / comp.name
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "table.md").write_text(res.text)
                if opts.charts:
                    res.charts = charts(comp, res.reports, out_dir)
                    if len({r["scenario"]["link_mbit"] for r in res.reports}) > 1:
                        from pyvmm.sim.plot import render_sweep

                        res.charts.append(render_sweep(res.reports, out_dir / "sweep.png",
                                                       comp.name))  # fmt: skip
        results.append(res)
    return results
