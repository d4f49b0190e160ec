"""`pyvmm sim ...`: argument parsing and printing only.

pyvmm sim [run] [BENCH SCENARIO OPTIONS] [MODEL OPTIONS] [--output REPORT.json]
pyvmm sim batch COMPARISON... [--output DIR] [--seeds N] [--filter GLOB] [MODEL OPTIONS]
pyvmm sim calibrate [COMPARISON...] --output DIR | --real DIR [--filter GLOB] [--max-time S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pyvmm.bench import report
from pyvmm.bench.cli import Parser, _int, run_parser
from pyvmm.bench.scenario import Hardware, Scenario, hardware_from_dict
from pyvmm.sim.model import SimModel

COMMANDS = ("run", "batch", "calibrate")

MODEL_HELP = {
    "guest_rate_mib_s": "MiB/s each vCPU rewrites unthrottled (--stress-rate, if set, wins)",
    "wake_lag_ms": "after a throttle sleep of S ms a vCPU writes nothing for L ms more: "
    "S:L,S:L,... (linear between points)",
    "jitter_pct": "each vCPU's rate drawn within +- this %% of it, per seed",
    "seed": "the first seed",
    "loopback_mib_s": "the link's rate without --link-mbit",
    "latency_ms": "one-way link latency",
    "zero_scan_gib_s": "how fast the source gets through never-written (zero) pages",
    "sync_ms_per_gib": "what a dirty sync costs the migration thread per GiB of RAM",
    "state_bytes": "machine state sent at the switchover",
    "state_bytes_per_vcpu": "machine state per vCPU",
    "dest_load_ms": "the destination's restore",
    "setup_ms": "the migration's setup before the first sync",
    "sample_ms": "progress sample spacing in the report",
}


def _model_options(p: argparse.ArgumentParser, unset: bool = False) -> None:
    """One option per SimModel field; with `unset`, a field not given is None (a batch
    takes each comparison's own model then)."""
    d = SimModel()
    g = p.add_argument_group("model (docs/sim.md)")
    for f in dataclasses.fields(SimModel):
        default = getattr(d, f.name)
        g.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=None if unset else default,
            help=f"{MODEL_HELP[f.name]} (default {default}"
            + (", or the comparison's)" if unset else ")"),
        )


def _model(a: argparse.Namespace) -> SimModel:
    return SimModel(**{f.name: getattr(a, f.name) for f in dataclasses.fields(SimModel)})


def sim_run_parser() -> argparse.ArgumentParser:
    p = run_parser()
    p.prog = "pyvmm sim"
    p.description = (
        "Simulate one migration of a memstress guest on a virtual clock with pyvmm's own "
        "pre-copy loop and convergence policies; write the same JSON report as pyvmm bench."
    )
    for action in p._actions:  # the real engine's own knobs mean nothing here
        if action.dest in ("binary", "trace", "heatmap", "sleep", "transport"):
            action.help = argparse.SUPPRESS
        elif action.dest == "link_mbit":
            action.help = "the modelled link's rate in Mbit/s (default: --loopback-mib-s)"
    _model_options(p)
    return p


def batch_parser() -> argparse.ArgumentParser:
    from pyvmm.sim.comparisons import COMPARISONS

    p = Parser(
        prog="pyvmm sim batch",
        description="Run named comparisons in simulation; print their tables (and write one "
        "report per run and seed, table.md and charts to DIR/COMPARISON/ with --output).",
    )
    p.add_argument(
        "comparisons", nargs="+", metavar="COMPARISON", help=f"{', '.join(COMPARISONS)}, or all"
    )
    p.add_argument("--output", type=Path, metavar="DIR")
    p.add_argument("--seeds", type=_int(1), default=None, metavar="N",
                   help="runs per configuration, seeds SEED, SEED+1, ... (default 3 for "
                   "series-2024-full, else 1)")  # fmt: skip
    p.add_argument("--filter", default="*", metavar="GLOB", help="on COMPARISON/SCENARIO")
    p.add_argument("--no-charts", action="store_true", help="tables only")
    p.add_argument("--quiet", action="store_true", help="print the tables only")
    _model_options(p, unset=True)
    return p


def calibrate_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="pyvmm sim calibrate",
        description="Run a comparison's configurations for real and in simulation and print "
        "them side by side; the guest's unthrottled rate is measured on the real guest.",
    )
    p.add_argument("comparisons", nargs="*", default=["series-2024"], metavar="COMPARISON",
                   help="bench comparisons (default series-2024)")  # fmt: skip
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="run the real side: reports go to DIR/COMPARISON/NAME-real.json and "
                   "are reused when present")  # fmt: skip
    p.add_argument("--real", type=Path, metavar="DIR",
                   help="take the real side from a `pyvmm bench batch --output DIR` tree "
                   "(every repeat; compared with their mean)")  # fmt: skip
    p.add_argument("--filter", default="*", metavar="GLOB", help="on COMPARISON/SCENARIO")
    p.add_argument("--max-time", type=_int(1), metavar="S", help="cap every real run's --max-time")
    p.add_argument("--sleep", type=float, default=3.0, metavar="S",
                   help="steady workload before each real migration (default 3)")  # fmt: skip
    p.add_argument("--seeds", type=_int(1), default=1, metavar="N",
                   help="simulations per configuration, seeds SEED, SEED+1, ...; their mean "
                   "is compared (default 1)")  # fmt: skip
    _model_options(p)
    return p


# --- commands --------------------------------------------------------------------------------


def cmd_run(argv: Sequence[str]) -> int:
    from pyvmm.sim.engine import simulate

    a = sim_run_parser().parse_args(argv)
    if a.sync is None:
        a.sync = "iteration" if a.periodic_throttle or a.auto_converge_legacy else "timer"
    if a.link_mbit and a.transport == "unix":
        a.transport = "tcp"  # a modelled link needs no veth pair; the option reads the same
    scenario = Scenario(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Scenario)})
    hw = Hardware(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Hardware)})
    if a.verbose:  # every policy decision, as the VMM logs it
        logging.basicConfig(level=logging.INFO, format="pyvmm: %(name)s: %(message)s")
    rpt = simulate(scenario, hw, _model(a))
    if a.output:
        report.write(rpt, a.output)
        r = rpt["result"]
        if not a.quiet:
            print(f"{r['status']}: {r['total_time'] / 1000:.1f} s, downtime {r['downtime']} ms, "
                  f"{r['dirty_syncs']} syncs, {r['iteration_count']} iterations, max throttle "
                  f"{r['max_throttle_pcent']}% (simulated in "
                  f"{rpt['simulation']['wall_s']:.2f} s)")  # fmt: skip
    else:
        report.validate(rpt)
        print(json.dumps(rpt, indent=2))
    return 0


def cmd_batch(argv: Sequence[str]) -> int:
    from pyvmm.sim.batch import SimBatchOptions, run_batch

    a = batch_parser().parse_args(argv)
    given = {
        f.name: v for f in dataclasses.fields(SimModel) if (v := getattr(a, f.name)) is not None
    }
    opts = SimBatchOptions(a.comparisons, given, a.output, a.seeds, a.filter, not a.no_charts)
    say = (lambda _t: None) if a.quiet else (lambda t: print(t, file=sys.stderr, flush=True))
    results = run_batch(opts, say)
    if not any(r.reports for r in results):
        raise ValueError(f"--filter {a.filter!r} selects no run")
    for res in results:
        print(f"## {res.comparison.name}\n\n{res.comparison.description}\n\n{res.text}")
        for png in res.charts:
            print(png)
    return 0


def cmd_calibrate(argv: Sequence[str]) -> int:
    from pyvmm.sim import calibrate
    from pyvmm.sim.model import format_lag

    a = calibrate_parser().parse_args(argv)
    if (a.output is None) == (a.real is None):
        raise ValueError("give either --output DIR (run the real side here) or --real DIR "
                         "(a bench batch's output)")  # fmt: skip
    say = lambda t: print(t, file=sys.stderr, flush=True)  # noqa: E731
    runs = calibrate.selected_runs(a.comparisons, a.filter, a.max_time)
    if not runs:
        raise ValueError(f"--filter {a.filter!r} selects no run")
    if a.real is not None:
        pairs = calibrate.batch_runs(runs, a.real)
        if not pairs:
            raise ValueError(f"{a.real} holds no pyvmm report of the selected runs")
    else:
        pairs = calibrate.real_runs(runs, a.output, a.sleep, say)
    hws = [hardware_from_dict(pair.reals[0]["hardware"]) for pair in pairs]
    measures = calibrate.measured_guests(hws, say)
    calibrate.simulate_pairs(pairs, _model(a), measures, a.seeds)
    for key, m in measures.items():
        print(f"guest {key[0]} vCPU(s) x {key[1]} MiB: {m.rate_mib_s:.0f} MiB/s per vCPU "
              f"unthrottled, wake lag {format_lag(m.lag) or '-'} (sleep ms:lag ms)")  # fmt: skip
    print()
    print(calibrate.table(pairs))
    done = [p for p in pairs if all(r["result"]["status"] == "completed" for r in p.reals)]
    print(f"\nwithin the goal (10 % on total time, 2 on iterations): "
          f"{sum(calibrate.within_goal(p) for p in done)} of {len(done)} completed")  # fmt: skip
    return 0


def main(argv: Sequence[str]) -> int:
    """Run a sim command; errors are turned into one line by pyvmm.cli.main."""
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    try:
        return {"run": cmd_run, "batch": cmd_batch, "calibrate": cmd_calibrate}[command](argv)
    except KeyboardInterrupt:
        print("pyvmm: sim interrupted", file=sys.stderr)
        return 130
