"""`pyvmm bench batch`: run named comparisons, one JSON report per run, then a Markdown
table and charts per comparison, and optionally a summary page (docs/results.md)."""

from __future__ import annotations

import datetime
import fnmatch
import platform
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyvmm.bench import plot, report, table
from pyvmm.bench.comparisons import COMPARISONS, Comparison
from pyvmm.bench.display import Display
from pyvmm.bench.engine import RunOptions, run
from pyvmm.bench.scenario import ScenarioError
from pyvmm.bench.vms import BenchError, is_qemu


@dataclass
class BatchOptions:
    output: Path
    names: list[str]
    filter: str = "*"
    repeat: int = 1
    peers: list[str] = field(default_factory=list)  # QEMU binaries run beside pyvmm
    summary: Path | None = None
    command: str = ""  # how the batch was started, for the summary page
    sleep_s: float = 5.0
    max_time: int | None = None  # caps every run's max_time (a quick look at a comparison)
    resume: bool = False  # keep the reports an earlier (interrupted) batch wrote
    summary_only: bool = False  # run nothing: tables, charts and page from the reports there


@dataclass
class ComparisonResult:
    comparison: Comparison
    reports: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # runs a peer could not do
    failures: list[str] = field(default_factory=list)
    charts: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # --summary-only: runs with no report


def select(names: list[str], table: Mapping[str, Callable[[], Comparison]]) -> list[Comparison]:
    """The comparisons `names` asks for from `table` ("all": every one, in its order)."""
    unknown = [n for n in names if n != "all" and n not in table]
    if unknown:
        raise ScenarioError(f"unknown comparison {unknown[0]!r} (have: {', '.join(table)}, all)")
    wanted = list(table) if "all" in names else names
    return [table[n]() for n in wanted]


def selected(names: list[str]) -> list[Comparison]:
    return select(names, COMPARISONS)


def run_batch(opts: BatchOptions, display_for: Callable[[str], Display],
              say: Callable[[str], None]) -> list[ComparisonResult]:  # fmt: skip
    """Every selected run, `repeat` times, on pyvmm and on each peer binary. A run that a
    peer cannot do is noted and skipped; a run that fails is noted, and the batch goes on."""
    results = []
    for comp in selected(opts.names):
        res = ComparisonResult(comp)
        out_dir = opts.output / comp.name
        for scenario, hw in comp.runs:
            if not fnmatch.fnmatch(f"{comp.name}/{scenario.name}", opts.filter):
                continue
            if opts.max_time is not None:
                scenario = replace(scenario, max_time=min(scenario.max_time, opts.max_time))
            for binary in ["pyvmm", *opts.peers]:
                suffix = "" if binary == "pyvmm" else "-qemu"
                # A peer's refusal is kept, so that --resume and --summary-only know it.
                skipped = out_dir / f"{scenario.name}{suffix}.skipped"
                if (opts.resume or opts.summary_only) and skipped.exists():
                    res.notes.append(skipped.read_text().strip())
                    continue
                for rep in range(1, opts.repeat + 1):
                    tag = f"{comp.name}/{scenario.name}{suffix} #{rep}"
                    path = out_dir / f"{scenario.name}{suffix}-{rep}.json"
                    if opts.summary_only:
                        if path.exists():
                            res.reports.append(report.load(path))
                        else:
                            res.missing.append(tag)
                        continue
                    say(f"== {tag}")
                    if opts.resume and path.exists():
                        res.reports.append(report.load(path))
                        say("   kept from an earlier batch")
                        continue
                    try:
                        rpt = run(scenario, hw, RunOptions(binary, opts.sleep_s), display_for(tag))
                    except ScenarioError as exc:
                        if not is_qemu(binary):
                            raise
                        note = f"not run on {Path(binary).name}: {exc}"
                        res.notes.append(note)
                        out_dir.mkdir(parents=True, exist_ok=True)
                        skipped.write_text(note + "\n")
                        say(f"   skipped: {exc}")
                        break
                    except BenchError as exc:
                        res.failures.append(f"{tag}: failed ({exc})")
                        say(f"   failed: {exc}")
                        continue
                    report.write(rpt, path)
                    res.reports.append(rpt)
                    r = rpt["result"]
                    say(f"   {r['status']}: {r['total_time'] / 1000:.1f} s, downtime "
                        f"{r['downtime']} ms, {r['dirty_syncs']} syncs, "
                        f"{r['iteration_count']} iterations, "
                        f"max throttle {r['max_throttle_pcent']}%")  # fmt: skip
        if res.reports:
            (out_dir / "table.md").write_text(tables(comp, res.reports))
            res.charts = charts(comp, res.reports, out_dir)
        results.append(res)
        if opts.summary:  # after each comparison: a long batch cut short keeps what it did
            opts.summary.write_text(summary_page(opts, results))
    return results


def tables(comp: Comparison, reports: list[dict[str, Any]]) -> str:
    """The comparison's table, and its own tables after it (comp.summary)."""
    text = table.markdown(reports)
    if comp.summary is not None:
        text += "\n" + comp.summary(reports)
    return text


def charts(comp: Comparison, reports: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One chart per group, with the first repeat of each run on each VMM."""
    groups: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for rpt in reports:
        lbl = report.label(rpt)
        if lbl not in seen:
            seen.add(lbl)
            groups.setdefault(comp.chart(rpt["scenario"]["name"]), []).append(rpt)
    pngs = []
    for key, group in groups.items():
        png = out_dir / (f"chart-{key}.png" if key else "chart.png")
        plot.render(group, png)
        pngs.append(png)
    return pngs


def summary_page(opts: BatchOptions, results: list[ComparisonResult]) -> str:
    """The Markdown page a batch leaves behind: how it was made, then per comparison the
    table, the notes and the charts."""
    base = opts.summary.parent if opts.summary else Path(".")
    lines = [
        "# pyvmm bench results",
        "",
        f"Produced by `{opts.command}` on {datetime.date.today().isoformat()}"
        f" ({platform.node()}, Linux {platform.release()}, {_cpus()} CPUs,"
        f" Python {platform.python_version()}). The command writes each run's JSON report to"
        f" `{_rel(opts.output, base)}/COMPARISON/`; each chart has an HTML version beside it.",
        "",
        "This page is generated; do not edit it by hand. docs/bench.md explains the harness, "
        "docs/convergence.md discusses the convergence results.",
        "",
    ]
    missing = [tag for res in results for tag in res.missing]
    if missing:
        done = sum(len(res.reports) for res in results)
        lines += [
            f"**Incomplete:** {done} of {done + len(missing)} runs have a report; the runs "
            "listed under each table had not run when this page was written (the same "
            "command with `--resume` runs them).",
            "",
        ]
    for res in results:
        comp = res.comparison
        lines += [f"## {comp.name}", "", comp.description, ""]
        if res.reports:
            lines += [tables(comp, res.reports), ""]
        notes = list(dict.fromkeys(res.notes + res.failures))  # the same skip, once
        if res.missing:
            notes.append("not run yet: " + _grouped(res.missing))
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
        for png in res.charts:
            lines += [f"![{comp.name}: {png.stem}]({_rel(png, base)})", ""]
    return "\n".join(lines)


def _grouped(tags: list[str]) -> str:
    """ "c/a #2", "c/a #3", "c/b #2" as "c/a #2, #3; c/b #2"."""
    runs: dict[str, list[str]] = {}
    for tag in tags:
        run, _, rep = tag.rpartition(" ")
        runs.setdefault(run, []).append(rep)
    return "; ".join(f"{run} {', '.join(reps)}" for run, reps in runs.items())


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def print_err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
