"""`pyvmm ...`: argument parsing and printing only; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence

from pyvmm import __version__

log = logging.getLogger("pyvmm")

SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGkmg]?)[iI]?[bB]?\s*$")


class CliError(Exception):
    """A one-line error for the user; main() prints it and exits non-zero."""


def parse_size(text: str) -> int:
    """'256M', '1G', '65536K'; a bare number means MiB, as in QEMU's -m."""
    match = SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (use e.g. 256M, 1G, 65536K)")
    value, unit = int(match.group(1)), match.group(2).upper() or "M"
    return value << {"K": 10, "M": 20, "G": 30}[unit]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number")
    return value


# --- subcommands -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    # Signals go to the control loop from the start: a SIGTERM during start-up ends the VM
    # as soon as it exists, cleanly (the handler only writes to a pipe).
    from pyvmm.monitor.control import ControlLoop

    loop = ControlLoop()
    loop.after_close = signal.SIG_IGN  # the process ends right after the VM
    loop.install_signal_handlers()
    from pyvmm.monitor.process import make_vmm
    from pyvmm.monitor.vmm import RunOptions

    options = RunOptions(
        image=args.guest,
        mem_bytes=args.mem,
        vcpus=args.vcpus,
        cmdline=args.append,
        serial_path=args.serial,
        qmp=args.qmp,
        qmp_allow_remote=args.qmp_allow_remote,
        time_limit_s=args.time_limit,
        dirty_ring_entries=args.dirty_ring,
        dirty_ring_quirk=args.dirty_ring_quirk or "auto",
        dirty_ring_reaper=args.x_dirty_ring_reaper != "off",
        incoming=args.incoming,
        start_paused=args.S,
        serial2=args.serial2,
        colo_compare=args.colo_compare,
    )
    if args.serial2 is not None:
        from pyvmm.machine.uartsock import parse_uart_address

        try:
            parse_uart_address(args.serial2)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.colo_compare is not None and not args.colo_compare.startswith("unix:"):
        raise CliError(f"invalid --colo-compare address {args.colo_compare!r}: use unix:PATH")
    if args.guest is None and args.incoming is None:
        raise CliError("GUEST is required unless --incoming is given")
    if args.dirty_ring is None and (args.dirty_ring_quirk or args.x_dirty_ring_reaper):
        option = "--dirty-ring-quirk" if args.dirty_ring_quirk else "--x-dirty-ring-reaper"
        raise CliError(f"{option} needs --dirty-ring")
    result = make_vmm(options, loop=loop).run()
    if result.error:
        raise CliError(result.reason)
    print(f"pyvmm: {result.reason}", file=sys.stderr)
    return result.code


def cmd_guests(args: argparse.Namespace) -> int:
    from pyvmm.machine.images import GUESTS_DIR, builtin_images

    images = builtin_images()
    if not images:
        raise CliError(f"no guest images in {GUESTS_DIR}; reinstall with: pip install -e .")
    width = max(len(name) for name in images)
    for name, path in images.items():
        print(f"{name:<{width}}  {path}")
    return 0


def cmd_qmp(args: argparse.Namespace) -> int:
    from pyvmm.monitor.client import QmpCommandError, qmp_call

    try:
        cmd_args = json.loads(args.json_args) if args.json_args else None
    except json.JSONDecodeError as exc:
        raise CliError(f"JSON-ARGS is not valid JSON: {exc}") from None
    if cmd_args is not None and not isinstance(cmd_args, dict):
        raise CliError('JSON-ARGS must be a JSON object, e.g. \'{"uri": "tcp:127.0.0.1:4444"}\'')
    try:
        result = qmp_call(args.address, args.command, cmd_args, timeout_s=args.timeout)
    except QmpCommandError as exc:
        print(json.dumps({"class": exc.error_class, "desc": exc.desc}))
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from pyvmm.migrate_cli import run_migrate

    return run_migrate(args)


def cmd_dirtyrate(args: argparse.Namespace) -> int:
    from pyvmm.monitor.client import QmpCommandError, SyncQmp

    calc_ms = round(args.calc_time * 1000)
    try:
        with SyncQmp(args.address, timeout_s=args.calc_time + 30) as qmp:
            qmp.cmd("calc-dirty-rate", **{
                "calc-time": calc_ms, "calc-time-unit": "millisecond", "mode": args.mode,
            })  # fmt: skip
            deadline = time.monotonic() + args.calc_time + 30
            while True:
                info = qmp.cmd("query-dirty-rate")
                if info["status"] == "measured":
                    break
                if time.monotonic() > deadline:
                    raise CliError("the dirty-rate measurement did not finish")
                time.sleep(min(0.05, args.calc_time / 4))
    except QmpCommandError as exc:
        raise CliError(exc.desc) from None
    print(f"dirty-rate: {info.get('dirty-rate', 0)} MiB/s")
    for vcpu in info.get("vcpu-dirty-rate", []):
        print(f"vcpu {vcpu['id']}: {vcpu['dirty-rate']} MiB/s")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyvmm.trace.errors import TraceError
    from pyvmm.trace.run import TraceOptions, parse_target, run_trace

    try:
        pid, command = parse_target(args.target)
        options = TraceOptions(
            pid=pid,
            command=command,
            filters=args.filter,
            summary=args.summary,
            quiet=args.quiet,
            output=Path(args.output) if args.output else None,
            duration_s=args.duration,
        )
        return run_trace(options, sys.stdout, sys.stderr).exit_code
    except TraceError as exc:
        raise CliError(str(exc)) from None


def cmd_timeline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyvmm.timeline_cli import TimelineError, record_timeline, show_timeline

    try:
        if args.action == "show":
            return show_timeline([Path(f) for f in args.files])
        return record_timeline(args.address, args.seconds, Path(args.output))
    except TimelineError as exc:
        raise CliError(str(exc)) from None


def cmd_colo(args: argparse.Namespace) -> int:
    from pyvmm.colo.demo import DemoConfig, run_colo_demo

    config = DemoConfig(
        max_time_ms=args.max_time, passive_count=args.passive_count,
        rate_per_s=args.rate, burn_pct=args.burn, keep=args.keep,
    )  # fmt: skip
    return run_colo_demo(config)


def cmd_colo_compare(args: argparse.Namespace) -> int:
    from pyvmm.colo.proxy import ProxyConfig, run_compare

    config = ProxyConfig(
        args.listen, args.primary, args.secondary, args.control, args.primary_qmp,
        args.secondary_qmp, args.timeout, args.check_period, args.auto_failover,
    )  # fmt: skip
    return run_compare(config)


def cmd_demo(args: argparse.Namespace) -> int:
    from pyvmm.demo import run_demo

    return run_demo(seconds=args.seconds)


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyvmm",
        description="A KVM virtual machine monitor in Python for live-migration research.",
    )
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="boot a guest and run it", description="Boot a PVH guest.")
    run.add_argument(
        "guest",
        metavar="GUEST",
        nargs="?",
        help="built-in guest name or path to a PVH ELF (not needed with --incoming)",
    )
    run.add_argument(
        "--mem",
        type=parse_size,
        default=256 << 20,
        metavar="SIZE",
        help="guest RAM, with K/M/G suffix (default 256M)",
    )
    run.add_argument("--vcpus", type=positive_int, default=1, metavar="N", help="default 1")
    run.add_argument("--append", default="", metavar="CMDLINE", help="guest command line")
    run.add_argument("--serial", metavar="FILE", help="write the console here (default stdout)")
    run.add_argument(
        "--serial2",
        metavar="ADDR",
        help="COM2 (0x2f8), a two-way UART whose host side is a socket: unix:PATH or "
        "tcp:HOST:PORT connects, with ,server appended it listens",
    )
    run.add_argument(
        "--colo-compare",
        metavar="unix:PATH",
        help="COLO primary: the comparator's control socket (pyvmm colo-compare)",
    )
    run.add_argument("--qmp", metavar="ADDR", help="QMP monitor at unix:PATH or tcp:HOST:PORT")
    run.add_argument(
        "--qmp-allow-remote", action="store_true", help="allow a non-loopback TCP QMP address"
    )
    run.add_argument(
        "--time-limit",
        type=positive_float,
        metavar="S",
        help="end the VM after S seconds (exit code 0)",
    )
    run.add_argument(
        "--dirty-ring",
        type=positive_int,
        nargs="?",
        const=0,
        metavar="ENTRIES",
        help="track dirty pages with a per-vCPU dirty ring (no value: the largest)",
    )
    run.add_argument(
        "--dirty-ring-quirk",
        choices=["auto", "lossy", "reliable"],
        help="does a full dirty ring lose entries on this host? auto (default): a cached "
        "start-up probe decides; lossy: a full ring resends the whole guest; reliable: never",
    )
    run.add_argument(
        "--x-dirty-ring-reaper",
        choices=["on", "off"],
        help="experimental: off holds the reaper thread back, so rings fill and are "
        "harvested at ring-full exits (default on)",
    )
    run.add_argument(
        "--incoming",
        metavar="URI",
        help="receive a migration: tcp:HOST:PORT, unix:PATH, or defer (then QMP migrate-incoming)",
    )
    run.add_argument(
        "-S", action="store_true", help="do not start the vCPUs (QEMU's -S); QMP cont starts them"
    )
    run.set_defaults(func=cmd_run)

    guests = sub.add_parser("guests", help="list the built-in guest images")
    guests.set_defaults(func=cmd_guests)

    qmp = sub.add_parser("qmp", help="send one QMP command to a running pyvmm (or QEMU)")
    qmp.add_argument("address", metavar="ADDR", help="unix:PATH or tcp:HOST:PORT")
    qmp.add_argument("command", metavar="COMMAND")
    qmp.add_argument("json_args", metavar="JSON-ARGS", nargs="?", help="arguments as JSON")
    qmp.add_argument("--timeout", type=positive_float, default=30.0, metavar="S")
    qmp.set_defaults(func=cmd_qmp)

    mig = sub.add_parser("migrate", help="live-migrate a running pyvmm (over its QMP)")
    mig.add_argument("address", metavar="SRC_QMP_ADDR", help="the source's QMP address")
    mig.add_argument("uri", metavar="URI", help="where to: tcp:HOST:PORT or unix:PATH")
    mig.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a migration parameter in QMP units (repeatable), e.g. "
        "downtime-limit=300 max-bandwidth=1073741824",
    )
    mig.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="NAME=on|off",
        help="a migration capability (repeatable), e.g. events=on",
    )
    mig.add_argument(
        "--wait", action="store_true", help="return when it ends; exit 0 only if it completed"
    )
    mig.add_argument(
        "--json",
        action="store_true",
        help="print the final query-migrate result as one JSON object",
    )
    mig.add_argument(
        "--trace",
        metavar="FILE.json",
        help="record pyvmm's own timeline during the migration (implies --wait) and write it "
        "as a Trace Event Format file for ui.perfetto.dev",
    )
    mig.add_argument(
        "--cancel-after",
        type=positive_float,
        metavar="S",
        help="with --wait or --trace: send migrate_cancel if it has not ended after S seconds",
    )
    mig.add_argument(
        "--dest-qmp",
        metavar="ADDR",
        help="with --trace: the destination's QMP address, to record its timeline too",
    )
    mig.set_defaults(func=cmd_migrate)

    rate = sub.add_parser("dirtyrate", help="measure a running VM's dirty rate over QMP")
    rate.add_argument("address", metavar="ADDR", help="QMP address: unix:PATH or tcp:HOST:PORT")
    rate.add_argument(
        "--mode",
        choices=["page-sampling", "dirty-bitmap", "dirty-ring"],
        default="page-sampling",
        help="QEMU's measurement modes (default page-sampling)",
    )
    rate.add_argument(
        "--calc-time",
        type=positive_float,
        default=1.0,
        metavar="S",
        help="measurement window in seconds, 0.05 to 60 (default 1)",
    )
    rate.set_defaults(func=cmd_dirtyrate)

    trace = sub.add_parser(
        "trace",
        help="watch a VMM's KVM ioctls (pyvmm or QEMU; needs python-ptrace)",
        description="Trace the KVM ioctls of a running VMM (PID), or of COMMAND from its "
        "start (-- COMMAND...). Ctrl-C or SIGTERM detach and leave the VMM running.",
    )
    trace.add_argument("target", nargs="*", metavar="PID | -- COMMAND", help="what to trace")
    trace.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="WHAT",
        help="live lines only for these ioctl names (KVM_RUN or run) or fd kinds "
        "(kvm, vm, vcpu, vcpu:N); repeatable or comma-separated",
    )
    trace.add_argument("--summary", action="store_true", help="tables at the end, no live lines")
    trace.add_argument("-q", "--quiet", action="store_true", help="no live lines")
    trace.add_argument(
        "--output", metavar="FILE.json", help="write a Trace Event Format timeline (Perfetto)"
    )
    trace.add_argument(
        "--duration", type=positive_float, metavar="S", help="detach after S seconds"
    )
    trace.set_defaults(func=cmd_trace)

    tl = sub.add_parser(
        "timeline",
        help="pyvmm's own timelines: record one from running VMs, or summarise files",
        description="show FILE...: what a Trace Event Format file holds, track by track. "
        "record ADDR... --seconds S --output FILE: record running pyvmm VMs' own timelines "
        "for S seconds (docs/timeline.md).",
    )
    tl_sub = tl.add_subparsers(dest="action", metavar="ACTION", required=True)
    tl_show = tl_sub.add_parser("show", help="summarise timeline files")
    tl_show.add_argument("files", nargs="+", metavar="FILE.json")
    tl_rec = tl_sub.add_parser("record", help="record running pyvmm VMs for a while")
    tl_rec.add_argument("address", nargs="+", metavar="QMP_ADDR")
    tl_rec.add_argument("--seconds", type=positive_float, default=5.0, metavar="S")
    tl_rec.add_argument("--output", required=True, metavar="FILE.json")
    tl.set_defaults(func=cmd_timeline)

    demo = sub.add_parser("demo", help="the main job on embedded defaults")
    demo.add_argument("--seconds", type=positive_float, default=5.0, metavar="S")
    demo.set_defaults(func=cmd_demo)

    colo = sub.add_parser(
        "colo",
        help="COLO fault tolerance with hybrid mode: the RFC's demo on this machine",
        description="Primary, secondary, comparator and a load client; the phases COLO, "
        "miscompares, passive, back to COLO, failover; PASS or FAIL per phase.",
    )
    colo.add_argument(
        "--max-time",
        type=positive_int,
        default=2000,
        metavar="MS",
        help="x-colo-max-time for the demo (default 2000; QEMU's 10000)",
    )
    colo.add_argument(
        "--passive-count",
        type=positive_int,
        default=20,
        metavar="N",
        help="colo-passive-count for the demo (default 20; QEMU's 100)",
    )
    colo.add_argument(
        "--rate",
        type=positive_float,
        default=40.0,
        metavar="N",
        help="requests per second from the load client (default 40)",
    )
    colo.add_argument(
        "--burn",
        type=int,
        default=60,
        choices=range(0, 101),
        metavar="PCT",
        help="the primary guest's CPU burner on vCPU 1, %% (default 60)",
    )
    colo.add_argument("--keep", action="store_true", help="keep the work directory")
    colo.set_defaults(func=cmd_colo)

    cmp_ = sub.add_parser(
        "colo-compare",
        help="the COLO comparator: mirrors requests to both VMs, compares their answers",
    )
    cmp_.add_argument(
        "--listen",
        default="tcp:127.0.0.1:0",
        metavar="tcp:HOST:PORT",
        help="where clients connect (default tcp:127.0.0.1:0, printed)",
    )
    cmp_.add_argument(
        "--primary",
        required=True,
        metavar="unix:PATH",
        help="the primary's COM2 connects here (its --serial2)",
    )
    cmp_.add_argument(
        "--secondary", required=True, metavar="unix:PATH", help="the secondary's COM2 connects here"
    )
    cmp_.add_argument(
        "--control",
        required=True,
        metavar="unix:PATH",
        help="the primary's --colo-compare connects here",
    )
    cmp_.add_argument("--primary-qmp", metavar="ADDR", help="the primary's QMP (failover)")
    cmp_.add_argument("--secondary-qmp", metavar="ADDR", help="the secondary's QMP (failover)")
    cmp_.add_argument(
        "--timeout",
        type=positive_float,
        default=3000.0,
        metavar="MS",
        help="an answer without its twin forces a checkpoint after this long",
    )
    cmp_.add_argument(
        "--check-period",
        type=positive_float,
        default=3000.0,
        metavar="MS",
        help="how often old answers are looked for (default 3000)",
    )
    cmp_.add_argument(
        "--auto-failover",
        action="store_true",
        help="send x-colo-lost-heartbeat to the survivor when a VM is gone",
    )
    cmp_.set_defaults(func=cmd_colo_compare)

    sub.add_parser("bench", help="migration benchmark harness (pyvmm bench --help)", add_help=False)
    sub.add_parser("sim", help="migration simulator on a virtual clock (pyvmm sim --help)",
                   add_help=False)  # fmt: skip
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: subcommands of its own and a default one
        from pyvmm.bench.cli import main as bench_main

        return guarded(lambda _args: bench_main(argv[1:]), argparse.Namespace())
    if argv[:1] == ["sim"]:  # likewise: pyvmm sim [run|batch|calibrate]
        from pyvmm.sim.cli import main as sim_main

        return guarded(lambda _args: sim_main(argv[1:]), argparse.Namespace())
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="pyvmm: %(levelname)s %(name)s: %(message)s")
    return guarded(args.func, args)


def guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; every known failure becomes one line and a non-zero exit code."""
    try:
        return func(args)
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"pyvmm: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # every known failure of ours is one line, never a traceback
        from pyvmm.errors import describe_error

        message = describe_error(exc)
        if message is None:
            raise
        print(f"pyvmm: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
