"""The commands the docs tell a reader to run, collected so that a test runs every one.

The rule, for anyone writing docs (docs/README.md says it too): a fenced block tagged
```sh holds commands to run, one per line (a trailing backslash continues a line, `#`
starts a comment, `&` runs in the background, `& NAME=$!` too and keeps its pid); a block
tagged ```console is a transcript: lines starting with `$ ` are commands, the lines after
each are what it printed. Any other block (untagged, ```text, ```json, ```python) is
output, a listing or code, and is not run.

tests/test_docs_commands.py runs every block, in order, in a fresh directory, as bash
would, with these rewrites so that blocks can run side by side and quickly:

- `pyvmm` is this tree's CLI (`python -m pyvmm.cli`, PYTHONPATH of the tree);
- `/tmp/` becomes the block's own directory, and TCP port 4444 a free port;
- after a background command with `--qmp unix:P` or `--incoming unix:P|tcp:H:P`, the
  block waits until the socket exists (a reader starts the next command later);
- each command must exit 0, unless SUBSTITUTIONS says otherwise; in a console block, a
  command whose output shows `pyvmm: error: ...` must fail with exactly that line;
- a command listed in SUBSTITUTIONS runs as written there instead, for the reason given
  (smaller parameters, mostly); every entry must match a command in the docs.

Background processes are ended when the block ends (SIGTERM, then SIGKILL, by pid), and
the test kills the block's whole process group whatever happens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sub:
    run: str  # what the test runs instead (may be several commands joined with ;)
    why: str  # why (shown on the page's test id and in a failure)
    status: int = 0  # the exit status expected
    needs: tuple[str, ...] = ()  # "qemu", "ptrace", "socat", "netns"
    slow: bool = False


QEMU_HELLO = (
    "qemu-system-x86_64 -machine q35 -accel kvm -m 64 -nodefaults -no-user-config -display "
    "none -serial stdio -device isa-debug-exit,iobase=0x501,iosize=4 -kernel $(pyvmm guests "
    "| awk '$1 == \"hello\" {print $2}')"
)
LAB4_BENCH = (
    "pyvmm bench --cpus 2 --mem 32 --stress-rate 12 --bandwidth 32 --downtime 50 --sleep 1 "
    "--quiet --heatmap --trace lab4-trace.json --output lab4.json"
)
LAB7_WAIT = (
    "until awk -F'mib=' '/mib=/ { if ($2 + 0 >= 16) found = 1 } END { exit !found }' "
    "/tmp/q-src.serial; do sleep 1; done"
)
# Lab 5's generations: the parameters of the convergence fidelity work (issue 11).
LAB5_PARAMS = ("params:x-auto-converge-legacy,x-auto-converge-sync,cpu-responsive-throttle,"
               "cpu-throttle-responsive,cpu-periodic-throttle")  # fmt: skip


def _lab5_migrate(name: str, limit: int, cap: bool = True) -> str:
    caps = "--cap auto-converge=on " if cap else ""
    trace = name if name in ("none", "default") else f"gen-{name}"
    return (
        f"pyvmm migrate unix:/tmp/l5-{name}.qmp unix:/tmp/l5-{name}.sock {caps}"
        f"--set max-bandwidth=16777216 --trace {trace}.json --cancel-after {limit}; "
        'echo "pyvmm migrate exited with $?"'
    )


LAB5_MIGRATES = [
    (_lab5_migrate("none", 120, cap=False), 120, ()),
    (_lab5_migrate("default", 180), 180, ()),
    (_lab5_migrate("2013", 120), 120, (LAB5_PARAMS,)),
    *[
        (_lab5_migrate(n, 180), 180, (LAB5_PARAMS,))
        for n in ("iteration", "timer", "background", "rfc")
    ],
]
LAB5_SETS = [
    f"pyvmm qmp unix:/tmp/l5-{name}.qmp migrate-set-parameters '{params}'"
    for name, params in (
        ("2013", '{"x-auto-converge-legacy": true}'),
        ("iteration", '{"x-auto-converge-sync": "iteration"}'),
        ("timer", '{"x-auto-converge-sync": "timer"}'),
        ("background", '{"x-auto-converge-sync": "background", "cpu-responsive-throttle": true}'),
        ("rfc", '{"cpu-periodic-throttle": true}'),
    )
]

# Commands that a test cannot run as written. Keys are commands as the docs write them,
# continuation lines joined and comments removed, spaces collapsed (see normalize).
SLOW = {"slow": True}
SUBSTITUTIONS: dict[str, Sub] = {
    # --- README.md ---
    "pip install -e '.[test]' && pyvmm demo": Sub(
        "python -c 'import pytest, hypothesis, ptrace' && pyvmm demo --seconds 1",
        "the tests run in an installed tree: check the test extra is there; a shorter demo",
        slow=True,
    ),
    "pytest": Sub(
        "pytest -p no:cacheprovider -q --co tests/test_timeline.py",
        "the suite cannot run inside itself: collecting proves it loads",
    ),
    "pytest -m 'not slow'": Sub(
        "pytest -p no:cacheprovider -q -m 'not slow' --co tests/test_timeline.py",
        "the suite cannot run inside itself: collecting proves the marker works",
    ),
    'pyvmm run memstress --vcpus 2 --mem 512M --append "mb=128 rate=100" --time-limit 5': Sub(
        'pyvmm run memstress --vcpus 2 --mem 512M --append "mb=128 rate=100" --time-limit 1',
        "1 s instead of 5",
    ),
    "pyvmm dirtyrate unix:/tmp/vm.sock --mode dirty-bitmap --calc-time 2": Sub(
        "pyvmm dirtyrate unix:/tmp/vm.sock --mode dirty-bitmap --calc-time 0.5",
        "a 0.5 s window instead of 2",
    ),
    "pyvmm bench --cpus 2 --mem 256 --bandwidth 32 --auto-converge --output ac.json": Sub(
        "pyvmm bench --cpus 2 --mem 32 --bandwidth 32 --auto-converge --sleep 0.5 --max-time 4 "
        "--quiet --output ac.json",
        "32 MiB instead of 256, cut at 4 s (the report, chart and table are what is checked)",
        slow=True,
    ),
    "pyvmm bench --binary qemu-system-x86_64 --mem 256 --bandwidth 32 --auto-converge "
    "--sync iteration --output qemu.json": Sub(
        "pyvmm bench --binary qemu-system-x86_64 --mem 32 --bandwidth 32 --auto-converge "
        "--sync iteration --sleep 0.5 --max-time 4 --quiet --output qemu.json",
        "32 MiB instead of 256, cut at 4 s",
        needs=("qemu",),
        slow=True,
    ),
    "pyvmm bench batch series-2024 --repeat 3 --output results --summary results.md": Sub(
        "pyvmm bench batch series-2024 --filter 'series-2024/light-original' --max-time 3 "
        "--sleep 0.5 --quiet --output results --summary results.md",
        "one run of one scenario, cut at 3 s, instead of 21 scenarios x 3",
        slow=True,
    ),
    "pyvmm trace --summary --duration 5 PID": Sub(
        "pyvmm run memstress --append mb=8 --qmp unix:/tmp/t.qmp & PID=$!; _wait_path /tmp/t.qmp;"
        " pyvmm trace --summary --duration 1 $PID",
        "PID is a VMM the block starts; 1 s instead of 5",
        needs=("ptrace",),
    ),
    # --- docs/bench.md ---
    "pyvmm bench batch series-2024 --repeat 3 --binary qemu-system-x86_64 --output results": Sub(
        "pyvmm bench batch qemu-reference --binary qemu-system-x86_64 --max-time 3 --sleep 0.5 "
        "--quiet --output results",
        "the one-vCPU QEMU comparison, cut at 3 s per run, instead of every series row x 3 x 2",
        needs=("qemu",),
        slow=True,
    ),
    "pyvmm bench --cpus 2 --mem 256 --bandwidth 32 --auto-converge --heatmap --trace "
    "ac-trace.json --output ac.json": Sub(
        "pyvmm bench --cpus 2 --mem 32 --bandwidth 32 --auto-converge --heatmap --trace "
        "ac-trace.json --sleep 0.5 --max-time 4 --quiet --output ac.json",
        "32 MiB instead of 256, cut at 4 s",
        slow=True,
    ),
    # --- docs/convergence.md ---
    "pyvmm bench batch series-2024 qemu-reference --repeat 3 --binary qemu-system-x86_64 "
    "--output docs/results --summary docs/results.md --sleep 3": Sub(
        "pyvmm bench batch series-2024 qemu-reference --filter '*/light-timer-9.2' "
        "--binary qemu-system-x86_64 --max-time 3 --sleep 0.5 --quiet --output results "
        "--summary results.md",
        "one scenario cut at 3 s, written beside the block, instead of two hours into docs/",
        needs=("qemu",),
        slow=True,
    ),
    # --- docs/trace.md ---
    "pip install -e '.[trace]'": Sub(
        "python -c 'import ptrace'",
        "the tests run in an installed tree: check the extra",
        needs=("ptrace",),
    ),
    "pyvmm trace 12345": Sub(
        "pyvmm run memstress --append mb=8 --qmp unix:/tmp/t.qmp & PID=$!; _wait_path /tmp/t.qmp;"
        " pyvmm trace --duration 1 $PID > trace.out",
        "12345 is a VMM the block starts; detached after 1 s (Ctrl-C on a terminal)",
        needs=("ptrace",),
    ),
    "pyvmm trace --filter vm,KVM_GET_DIRTY_LOG 12345": Sub(
        "pyvmm trace --filter vm,KVM_GET_DIRTY_LOG --duration 1 $PID",
        "the VMM started for the line before; detached after 1 s",
        needs=("ptrace",),
    ),
    "pyvmm trace --summary --duration 5 12345": Sub(
        "pyvmm trace --summary --duration 1 $PID", "1 s instead of 5", needs=("ptrace",)
    ),
    "pyvmm trace -q --output boot.json -- qemu-system-x86_64 -accel kvm -kernel hello.elf ...": Sub(
        "pyvmm trace -q --output boot.json -- qemu-system-x86_64 -accel kvm -m 64 -nographic "
        "-no-reboot -display none -monitor none -serial null "
        "-device isa-debug-exit,iobase=0x501,iosize=4 -kernel $GUESTS/hello.elf",
        "the options the page leaves out (...) spelled out; hello exits through 0x501",
        status=1,
        needs=("ptrace", "qemu"),
        slow=True,
    ),
    "python tools/bench_trace.py --runs 5 --seconds 3": Sub(
        "python tools/bench_trace.py --runs 1 --seconds 1",
        "1 run of 1 s instead of 5 of 3",
        needs=("ptrace",),
        slow=True,
    ),
    # --- docs/timeline.md ---
    "python tools/bench_timeline.py --runs 5 --scenario paced": Sub(
        "python tools/bench_timeline.py --runs 1 --scenario paced",
        "1 run of each kind instead of 5",
        slow=True,
    ),
    "python tools/bench_timeline.py --runs 5 --scenario throttled": Sub(
        "python tools/bench_timeline.py --runs 1 --scenario throttled",
        "1 run of each kind instead of 5",
        slow=True,
    ),
    # --- docs/guests.md ---
    "make -C guest OUT=/abs/dir": Sub(
        "make -C guest OUT=$PWD/out", "a directory of the block's own instead of /abs/dir"
    ),
    "qemu-system-x86_64 -machine q35 -accel tcg -m 512 -nographic -no-reboot -serial stdio "
    "-monitor none -display none -nic none -device isa-debug-exit,iobase=0x501,iosize=4 "
    "-kernel guest/build/hello.elf": Sub(
        "qemu-system-x86_64 -machine q35 -accel tcg -m 512 -nographic -no-reboot -serial stdio "
        "-monitor none -display none -nic none -device isa-debug-exit,iobase=0x501,iosize=4 "
        "-kernel $GUESTS/hello.elf",
        "hello exits through isa-debug-exit, status (0 << 1) | 1; the image the package built",
        status=1,
        needs=("qemu",),
    ),
    # --- docs/qmp.md ---
    "qmp-shell /tmp/vm.qmp": Sub(
        "pyvmm run memstress --append mb=8 --qmp unix:/tmp/vm.qmp & _wait_path /tmp/vm.qmp;"
        " echo query-status | qmp-shell /tmp/vm.qmp",
        "the VM the page assumes is started first; the typed line comes from echo",
    ),
    'printf \'%s\\n\' \'{"execute":"qmp_capabilities"}\' \'{"execute":"query-status","id":1}\''
    " | socat -t 1 - UNIX-CONNECT:/tmp/vm.qmp": Sub(
        "pyvmm run memstress --append mb=8 --qmp unix:/tmp/vm.qmp & _wait_path /tmp/vm.qmp;"
        " printf '%s\\n' '{\"execute\":\"qmp_capabilities\"}' "
        '\'{"execute":"query-status","id":1}\' | socat -t 1 - UNIX-CONNECT:/tmp/vm.qmp',
        "the VM the page assumes is started first",
        needs=("socat",),
    ),
    # --- docs/course/README.md ---
    "pip install -e '.[test]'": Sub(
        "python -c 'import pytest, hypothesis, ptrace'",
        "the tests run in an installed tree: check the test extra is there",
    ),
    # --- docs/course/01-boot.md ---
    **{
        cmd: Sub(
            cmd,
            "QEMU needs seconds to run hello on this host (more when traced)",
            needs=("qemu", "ptrace") if "trace" in cmd else ("qemu",),
            slow=True,
        )
        for cmd in (
            QEMU_HELLO + '; echo "QEMU exited with $?"',
            "pyvmm trace --summary -- " + QEMU_HELLO + '; echo "pyvmm trace exited with $?"',
        )
    },
    # --- docs/course/02-exits.md ---
    "python tools/bench_core.py --quick": Sub(
        "python tools/bench_core.py --quick", "about a minute, most of it QEMU's boot", slow=True
    ),
    # --- docs/course/07-qemu.md ---
    LAB7_WAIT: Sub(LAB7_WAIT, "QEMU needs seconds to start the guest here", slow=True),
    "sleep 3": Sub("sleep 1", "the guest is running after 1 s; the steady state is not checked"),
    # --- docs/course/04-precopy.md ---
    LAB4_BENCH: Sub(LAB4_BENCH, "about 20 s", slow=True),
    # --- docs/course/05-convergence.md: smaller --cancel-after, and the generations only
    # where query-migrate-parameters lists their names ---
    **{
        cmd: Sub(
            cmd.replace(f"--cancel-after {limit}", "--cancel-after 3"),
            "cancelled after 3 s instead of " + str(limit),
            needs=needs,
            slow=True,
        )
        for cmd, limit, needs in LAB5_MIGRATES
    },
    **{
        cmd: Sub(cmd, "the parameter names of the throttle generations", needs=(LAB5_PARAMS,))
        for cmd in LAB5_SETS
    },
}


@dataclass
class Command:
    text: str  # as written (continuations joined, comment removed)
    line: int
    background: bool = False
    keep_pid: str = ""  # `NAME=$!` after the `&`
    expect_error: str | None = None  # console: the `pyvmm: error:` line it must print


@dataclass
class Block:
    path: Path
    line: int
    kind: str  # "sh" or "console"
    commands: list[Command] = field(default_factory=list)

    @property
    def ident(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def subs(self) -> list[Sub]:
        return [s for c in self.commands if (s := SUBSTITUTIONS.get(normalize(c.text)))]

    @property
    def needs(self) -> set[str]:
        """From the substitutions, and from the commands: `pyvmm trace` needs python-ptrace,
        QEMU needs QEMU, socat needs socat."""
        found = {n for s in self.subs() for n in s.needs}
        for c in self.commands:
            words = c.text.split()
            found |= {"ptrace"} if words[:2] == ["pyvmm", "trace"] else set()
            found |= {"qemu"} if "qemu-system-x86_64" in words else set()
            found |= {"socat"} if "socat" in words else set()
        return found

    @property
    def slow(self) -> bool:
        return any(s.slow for s in self.subs())


def normalize(command: str) -> str:
    return " ".join(command.split())


def strip_comment(line: str) -> str:
    """The line without a shell comment (a # at the start or after a blank, not quoted)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, text in lines:
        if pending is not None:
            number, text = pending[0], pending[1] + " " + text.strip()
            pending = None
        if text.endswith("\\"):
            pending = (number, text[:-1].rstrip())
            continue
        out.append((number, text))
    if pending is not None:
        out.append(pending)
    return out


BACKGROUND_PID = re.compile(r"\s&\s+(\w+=\$!)$")  # `cmd & NAME=$!`: keep the pid


def _command(number: int, text: str) -> Command | None:
    text = strip_comment(text).strip()
    if not text:
        return None
    if m := BACKGROUND_PID.search(text):
        return Command(text[: m.start()].rstrip(), number, True, keep_pid=m.group(1))
    background = text.endswith("&") and not text.endswith("&&")
    if background:
        text = text[:-1].rstrip()
    return Command(text, number, background)


def parse(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = list(enumerate(lines[i + 1 : j], start=i + 2))
        if m.group(1) == "sh":
            block = Block(path, i + 1, "sh")
            for number, text in _joined([(n, strip_comment(t)) for n, t in body]):
                if (cmd := _command(number, text)) is not None:
                    block.commands.append(cmd)
            blocks.append(block)
        elif m.group(1) == "console":
            blocks.append(_console(path, i + 1, body))
        i = j + 1
    return blocks


def _console(path: Path, line: int, body: list[tuple[int, str]]) -> Block:
    block = Block(path, line, "console")
    k = 0
    while k < len(body):
        number, text = body[k]
        if not text.startswith("$ "):
            k += 1
            continue
        parts = [text[2:]]
        while parts[-1].endswith("\\") and k + 1 < len(body):
            parts[-1] = parts[-1][:-1].rstrip()
            k += 1
            parts.append(body[k][1].strip())
        cmd = _command(number, " ".join(parts))
        k += 1
        output = []
        while k < len(body) and not body[k][1].startswith("$ "):
            output.append(body[k][1])
            k += 1
        if cmd is not None:
            errors = [o for o in output if o.startswith("pyvmm: error:")]
            cmd.expect_error = errors[0] if errors else None
            block.commands.append(cmd)
    return block


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in parse(path) if b.commands]
