"""`pyvmm bench ...`: argument parsing and printing only.

pyvmm bench [run] [SCENARIO OPTIONS] [--output REPORT.json] [--trace FILE.json] [--heatmap]
pyvmm bench batch COMPARISON... --output DIR [--filter GLOB] [--repeat N] [--binary QEMU]
pyvmm bench plot REPORT... [--output PNG] [--heatmap]
pyvmm bench table REPORT...
pyvmm bench schema
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from pyvmm.bench import report
from pyvmm.bench.comparisons import COMPARISONS
from pyvmm.bench.scenario import SYNC_MODES, Hardware, Scenario

COMMANDS = ("run", "batch", "plot", "table", "schema")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(low: int) -> type[int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"'{text}' must be at least {low}")
        return value

    return parse  # type: ignore[return-value]


def _mib(low: int) -> type[int]:
    """MiB, or a size with a unit: 512, 512M, 100G (binary units, as QEMU's -m)."""

    def parse(text: str) -> int:
        units = {"M": 1, "G": 1024, "T": 1024 * 1024}
        scale = units.get(text[-1:].upper(), 0)
        try:
            value = int(text[:-1] if scale else text) * (scale or 1)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid size '{text}' (MiB, or with M, G or T)"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"'{text}' must be at least {low} MiB")
        return value

    return parse  # type: ignore[return-value]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sleep",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds of steady workload before migrating, and on the destination "
        "after (default 5; guestperf's is 15)",
    )
    p.add_argument("--verbose", action="store_true", help="also log each step")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run_parser() -> argparse.ArgumentParser:
    d, h = Scenario(), Hardware()
    p = Parser(
        prog="pyvmm bench",
        description="Migrate a memstress guest between two local VMMs under one scenario and "
        "write a JSON report (guestperf's options and defaults, --mem in MiB).",
    )
    g = p.add_argument_group("guest")
    g.add_argument("--cpus", type=_int(1), default=h.cpus, help=f"vCPUs (default {h.cpus})")
    g.add_argument(
        "--mem",
        type=_mib(1),
        default=h.mem,
        help=f"working set in total, MiB or with a unit (100G) (default {h.mem}); the VM "
        "gets 256 MiB more",
    )
    g.add_argument(
        "--dirty-ring-size",
        type=_int(0),
        default=0,
        metavar="N",
        help="track with a dirty ring; N sizes dirty limit's ring (default 0: bitmap)",
    )
    g.add_argument(
        "--stress-mem",
        type=_mib(0),
        default=0,
        metavar="MIB",
        help="MiB each vCPU rewrites (default --mem / --cpus)",
    )
    g.add_argument(
        "--stress-rate",
        type=_int(0),
        default=0,
        metavar="MIBS",
        help="MiB/s per vCPU (default 0: flat out)",
    )
    g.add_argument(
        "--stress-pattern",
        choices=["word", "page"],
        default="word",
        help="one store per page (default) or every word",
    )
    m = p.add_argument_group("migration")
    m.add_argument("--max-iters", type=_int(1), default=d.max_iters, metavar="N")
    m.add_argument("--max-time", type=_int(1), default=d.max_time, metavar="S")
    m.add_argument(
        "--bandwidth",
        type=_int(1),
        default=d.bandwidth,
        metavar="MIBS",
        help=f"max-bandwidth in MiB/s (default {d.bandwidth})",
    )
    m.add_argument("--downtime", type=_int(1), default=d.downtime, metavar="MS")
    m.add_argument("--auto-converge", action="store_true")
    m.add_argument(
        "--auto-converge-step", type=_int(1), default=d.auto_converge_step, metavar="PCT"
    )
    m.add_argument(
        "--sync",
        choices=SYNC_MODES,
        default=None,
        help="x-auto-converge-sync: when auto-converge syncs: once per pass (QEMU <= 9.1), "
        "QEMU 9.2's 5 s timer, or the 2024 v1 series' background watcher (default timer; "
        "iteration with --periodic-throttle or --auto-converge-legacy)",
    )
    m.add_argument(
        "--periodic-throttle",
        action="store_true",
        help="cpu-periodic-throttle: the 2024 RFC's periodic throttle (syncs once per pass)",
    )
    m.add_argument(
        "--responsive",
        action="store_true",
        help="cpu-throttle-responsive: the 2024 series' responsive throttle",
    )
    m.add_argument(
        "--auto-converge-legacy",
        action="store_true",
        help="x-auto-converge-legacy: QEMU 1.6's 2013 auto-converge (syncs once per pass)",
    )
    m.add_argument("--dirty-limit", action="store_true")
    m.add_argument("--vcpu-dirty-limit", type=_int(1), default=d.vcpu_dirty_limit, metavar="MBS")
    m.add_argument(
        "--x-vcpu-dirty-limit-period",
        type=_int(1),
        default=d.x_vcpu_dirty_limit_period,
        metavar="MS",
    )
    m.add_argument("--transport", choices=["unix", "tcp"], default=d.transport)
    m.add_argument(
        "--link-mbit",
        type=_int(1),
        default=0,
        metavar="N",
        help="migrate over a veth pair shaped to N Mbit/s (needs --transport tcp)",
    )
    p.add_argument(
        "--binary",
        default="pyvmm",
        help="run on this QEMU binary instead of pyvmm, e.g. qemu-system-x86_64",
    )
    p.add_argument("--name", default="perfreport", help="the scenario's name in reports")
    p.add_argument("--output", type=Path, metavar="REPORT", help="JSON report (default stdout)")
    p.add_argument(
        "--trace",
        type=Path,
        metavar="FILE.json",
        help="both VMs record their own timelines; one Trace Event Format file (Perfetto)",
    )
    p.add_argument(
        "--heatmap",
        action="store_true",
        help="record the source's dirty pages per sync (at most 4096 cells) in the report",
    )
    _common(p)
    return p


def batch_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="pyvmm bench batch",
        description="Run named comparisons; one report per run in DIR/COMPARISON/, then a "
        "table and charts per comparison.",
    )
    p.add_argument(
        "comparisons", nargs="+", metavar="COMPARISON", help=f"{', '.join(COMPARISONS)}, or all"
    )
    p.add_argument("--output", type=Path, required=True, metavar="DIR")
    p.add_argument("--filter", default="*", metavar="GLOB", help="on COMPARISON/SCENARIO")
    p.add_argument("--repeat", type=_int(1), default=1, metavar="N")
    p.add_argument(
        "--binary",
        action="append",
        default=[],
        metavar="QEMU",
        help="also run each scenario on this QEMU binary (repeatable)",
    )
    p.add_argument("--summary", type=Path, metavar="MD", help="write a results page here")
    p.add_argument(
        "--max-time", type=_int(1), metavar="S", help="cap every run's --max-time (a quick look)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep reports already in DIR (an interrupted batch goes on where it stopped)",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: write the tables, charts and --summary page from the reports "
        "already in DIR, listing the runs that have none",
    )
    _common(p)
    return p


def plot_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="pyvmm bench plot", description="Chart reports: a PNG and an HTML page beside it."
    )
    p.add_argument("reports", nargs="+", type=Path, metavar="REPORT")
    p.add_argument(
        "--output",
        type=Path,
        metavar="PNG",
        help="default: the first report's stem .png in the current directory",
    )
    p.add_argument(
        "--heatmap",
        action="store_true",
        help="draw each report's dirty-page heatmap instead: STEM-heatmap.png (a strip, one "
        "row per sync) and STEM-heatmap.gif (one frame per sync)",
    )
    return p


def table_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="pyvmm bench table", description="The comparison table of reports, in Markdown."
    )
    p.add_argument("reports", nargs="+", type=Path, metavar="REPORT")
    return p


# --- commands --------------------------------------------------------------------------------


def cmd_run(argv: Sequence[str]) -> int:
    from pyvmm.bench.display import make_display
    from pyvmm.bench.engine import RunOptions, run
    from pyvmm.bench.vms import resolve_binary

    a = run_parser().parse_args(argv)
    if a.sync is None:  # as pyvmm resolves x-auto-converge-sync left at its default
        a.sync = "iteration" if a.periodic_throttle or a.auto_converge_legacy else "timer"
    # The options are named after the fields (--max-iters is max_iters), so one loop fills
    # each dataclass.
    scenario = Scenario(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Scenario)})
    hw = Hardware(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Hardware)})
    _logging(a.verbose)
    display = make_display(a.quiet)
    try:
        options = RunOptions(resolve_binary(a.binary), a.sleep, trace=a.trace, heatmap=a.heatmap)
        rpt = run(scenario, hw, options, display)
    finally:
        display.close()
    if a.output:
        report.write(rpt, a.output)
    else:
        report.validate(rpt)
        print(json.dumps(rpt, indent=2))
    result = rpt["result"]
    if result["status"] == "failed":
        print(f"pyvmm: error: the migration failed: {result['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_batch(argv: Sequence[str]) -> int:
    from pyvmm.bench.batch import BatchOptions, print_err, run_batch
    from pyvmm.bench.display import Plain, Quiet
    from pyvmm.bench.vms import resolve_binary

    a = batch_parser().parse_args(argv)
    _logging(a.verbose)
    opts = BatchOptions(
        output=a.output,
        names=a.comparisons,
        filter=a.filter,
        repeat=a.repeat,
        peers=[resolve_binary(b) for b in a.binary],
        summary=a.summary,
        # Resuming changes how long the batch took, not what it measured.
        command="pyvmm bench batch "
        + shlex.join(a for a in argv if a not in ("--resume", "--summary-only")),
        sleep_s=a.sleep,
        max_time=a.max_time,
        resume=a.resume,
        summary_only=a.summary_only,
    )
    say = (lambda _text: None) if a.quiet else print_err
    results = run_batch(opts, lambda _tag: Quiet() if a.quiet else Plain(5.0), say)
    if not any(r.reports or r.notes or r.failures or r.missing for r in results):
        raise ValueError(f"--filter {a.filter!r} selects no run")
    if a.summary_only and not any(r.reports for r in results):
        raise ValueError(f"{a.output} holds no report of the selected runs")
    failed = [f for r in results for f in r.failures]
    for note in failed:
        print(f"pyvmm: error: {note}", file=sys.stderr)
    return 1 if failed else 0


def cmd_plot(argv: Sequence[str]) -> int:
    from pyvmm.bench import plot

    a = plot_parser().parse_args(argv)
    reports = [report.load(p) for p in a.reports]
    if a.heatmap:
        from pyvmm.bench import heatmap

        for path, rpt in zip(a.reports, reports, strict=True):
            if a.output and len(reports) == 1:
                png = a.output
            else:
                png = (a.output.parent if a.output else Path.cwd()) / f"{path.stem}-heatmap.png"
            print("\n".join(str(p) for p in heatmap.render(rpt, png)))
        return 0
    png = a.output or Path.cwd() / (a.reports[0].stem + ".png")
    png_path, html_path = plot.render(reports, png)
    print(f"{png_path}\n{html_path}")
    return 0


def cmd_table(argv: Sequence[str]) -> int:
    from pyvmm.bench import table

    a = table_parser().parse_args(argv)
    print(table.markdown([report.load(p) for p in a.reports]))
    return 0


def cmd_schema(argv: Sequence[str]) -> int:
    print(json.dumps(report.SCHEMA, indent=2))
    return 0


def _logging(verbose: bool) -> None:
    import logging

    if verbose:
        logging.basicConfig(level=logging.INFO, format="pyvmm: %(name)s: %(message)s")


class Terminated(Exception):
    """SIGTERM, turned into an exception so that every cleanup runs."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    # One signal is enough: ignore more while the cleanups run.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def main(argv: Sequence[str]) -> int:
    """Run a bench command; errors are turned into one line by pyvmm.cli.main."""
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        return {
            "run": cmd_run,
            "batch": cmd_batch,
            "plot": cmd_plot,
            "table": cmd_table,
            "schema": cmd_schema,
        }[command](argv)
    except Terminated:
        print("pyvmm: bench terminated; its VMs and namespaces are gone", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("pyvmm: bench interrupted; its VMs and namespaces are gone", file=sys.stderr)
        return 130
