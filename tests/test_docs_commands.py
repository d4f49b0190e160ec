"""Every command the docs (README.md, docs/, docs/course/) tell a reader to run, run.

tests/doccmds.py has the rule (```sh and ```console blocks), the rewrites and the table
of substitutions; here each block becomes a bash script run in a fresh directory."""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import doccmds
import pytest
from doccmds import ROOT, SUBSTITUTIONS, Block, normalize

from conftest import kvm_usable, netns_missing, qemu_missing, require

BLOCKS = doccmds.all_blocks()
BLOCK_TIMEOUT_S = 900

PRELUDE = r"""
set -u
cleanup() {
    local pids; pids=$(jobs -p)
    [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
    for _ in $(seq 50); do [ -z "$(jobs -pr)" ] && break; sleep 0.1; done
    pids=$(jobs -pr); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    wait 2>/dev/null
    return 0
}
trap cleanup EXIT
fail() { echo "DOC COMMAND FAILED: $*" >&2; exit 97; }
_wait_path() {
    for _ in $(seq 600); do [ -e "$1" ] && return 0; sleep 0.05; done
    fail "$1 did not appear within 30 s"
}
_wait_port() {  # a listening socket in /proc/net/tcp (connecting would be the migration)
    local hex; hex=$(printf ':%04X ' "$1")
    for _ in $(seq 600); do
        grep -q "$hex[0-9A-F:]* 0A " /proc/net/tcp && return 0; sleep 0.05
    done
    fail "nothing listens on port $1 within 30 s"
}
"""


def _missing(need: str) -> str | None:
    if need == "qemu":
        return qemu_missing()
    if need == "netns":
        return netns_missing()
    if need == "socat":
        return None if shutil.which("socat") else "socat is not installed (Debian package socat)"
    if need == "ptrace":
        try:
            import ptrace  # noqa: F401
        except ImportError:
            return "python-ptrace is not installed (pip install -e '.[trace]')"
        return None
    if need.startswith("params:"):
        wanted = need.split(":", 1)[1].split(",")
        missing = [name for name in wanted if name not in _migration_parameters()]
        if missing:
            return (
                f"this pyvmm's query-migrate-parameters does not list {', '.join(missing)} "
                "(the throttle generations' parameter names)"
            )
        return None
    raise AssertionError(f"unknown need {need!r}")


_PARAMETERS: list[set[str]] = []


def _migration_parameters() -> set[str]:
    """What query-migrate-parameters lists, asked of a real pyvmm (once per session)."""
    if not _PARAMETERS:
        import tempfile

        from helpers import pyvmm_process, wait_for_path
        from pyvmm.monitor.client import SyncQmp

        with tempfile.TemporaryDirectory() as work:
            qmp = Path(work) / "p.qmp"
            with pyvmm_process(["run", "hello", "-S", "--qmp", f"unix:{qmp}"]):
                wait_for_path(qmp, 30)
                with SyncQmp(f"unix:{qmp}", timeout_s=30) as q:
                    _PARAMETERS.append(set(q.execute("query-migrate-parameters")))
    return _PARAMETERS[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rewrite(text: str, work: Path, port: int) -> str:
    return text.replace("/tmp/", f"{work}/").replace(":4444", f":{port}")


def _waits(text: str) -> list[str]:
    """What to wait for after a background command: its QMP or incoming socket."""
    words = shlex.split(text, posix=True) if "'" in text or '"' in text else text.split()
    waits = []
    for flag, value in itertools.pairwise(words):
        if flag not in ("--qmp", "--incoming", "-qmp", "-incoming"):  # pyvmm's and QEMU's
            continue
        value = value.split(",")[0]  # QEMU's unix:PATH,server=on,wait=off
        if value.startswith("unix:"):
            waits.append(f"_wait_path {shlex.quote(value[5:])}")
        elif value.startswith("tcp:"):
            waits.append(f"_wait_port {value.rsplit(':', 1)[1]}")
    return waits


def script(block: Block, work: Path, port: int) -> str:
    lines = [PRELUDE, f"cd {shlex.quote(str(work))}"]
    for n, cmd in enumerate(block.commands):
        sub = SUBSTITUTIONS.get(normalize(cmd.text))
        text = _rewrite(sub.run if sub else cmd.text, work, port)
        where = f"{block.path.name}:{cmd.line}"
        if cmd.background:
            lines.append(f"{text} & {cmd.keep_pid}")
            lines.extend(_waits(text))
            continue
        want = sub.status if sub else 0
        err = work / f".err{n}"
        if cmd.expect_error is not None:
            line = shlex.quote(_rewrite(cmd.expect_error, work, port))
            lines.append(f"{text} 2> {err}; _rc=$?; cat {err} >&2")
            lines.append(f'[ $_rc -ne 0 ] || fail "{where}: exit 0, wanted an error"')
            lines.append(f'grep -qxF -- {line} {err} || fail "{where}: no line "{line}')
        else:
            lines.append(f"{text}; _rc=$?")
            lines.append(f'[ $_rc -eq {want} ] || fail "{where}: exit $_rc, wanted {want}"')
        lines.append("(exit $_rc)")  # so that a documented `echo $?` sees the command's
    lines.append("exit 0")  # every command did what it should
    return "\n".join(lines) + "\n"


def _env(work: Path) -> dict[str, str]:
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "pyvmm"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pyvmm.cli "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ)
    # `python` is the one running the tests (its directory comes first: a venv's python is
    # found there, so that its packages are too).
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'tests'}"
    env["GUESTS"] = str(ROOT / "pyvmm" / "guests")
    env.pop("CI", None)  # the docs' commands are a reader's, not CI's
    return env


def run_block(block: Block, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "work"
    work.mkdir()
    for name in ("tools", "guest", "tests", "pyproject.toml"):  # relative paths in the docs
        (work / name).symlink_to(ROOT / name)
    port = _free_port()
    text = script(block, work, port)
    (tmp_path / "block.sh").write_text(text)
    proc = subprocess.Popen(
        ["bash", str(tmp_path / "block.sh")], cwd=work, env=_env(work), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{block.ident} ran over {BLOCK_TIMEOUT_S} s:\n{err[-3000:]}")
    finally:
        # Whatever the block left behind, by its process group (its own session).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _params() -> list[object]:
    out = []
    for block in BLOCKS:
        marks = [pytest.mark.slow] if block.slow else []
        out.append(pytest.param(block, id=block.ident, marks=marks))
    return out


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)  # the block's own limit ends it first
@pytest.mark.parametrize("block", _params())
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    require(kvm_usable())
    for need in sorted(block.needs):
        require(_missing(need))
    result = run_block(block, tmp_path)
    assert result.returncode == 0, (
        f"{block.ident}: exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}\n--- script\n{(tmp_path / 'block.sh').read_text()}"
    )


def test_every_substitution_matches_a_command_in_the_docs() -> None:
    written = {normalize(c.text) for b in BLOCKS for c in b.commands}
    stale = [key for key in SUBSTITUTIONS if key not in written]
    assert not stale, f"substitutions for commands no page has any more: {stale}"
    assert all(sub.why for sub in SUBSTITUTIONS.values())


def test_the_block_parser(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```sh\n"
        "pyvmm run a &   # started\n"
        "pyvmm migrate x \\\n"
        "    y --wait\n"
        "echo '# not a comment'\n"
        "pyvmm run b & B=$!\n"
        "```\n"
        "```\nnot run\n```\n"
        "```console\n"
        "$ pyvmm dirtyrate q --mode dirty-bitmap\n"
        "pyvmm: error: mode dirty-bitmap is not enabled, use other method instead.\n"
        "$ echo hi\n"
        "hi\n"
        "```\n"
    )
    sh, console = doccmds.parse(page)
    assert [(c.text, c.background, c.keep_pid, c.line) for c in sh.commands] == [
        ("pyvmm run a", True, "", 2), ("pyvmm migrate x y --wait", False, "", 3),
        ("echo '# not a comment'", False, "", 5), ("pyvmm run b", True, "B=$!", 6),
    ]  # fmt: skip
    assert [(c.text, c.expect_error) for c in console.commands] == [
        ("pyvmm dirtyrate q --mode dirty-bitmap",
         "pyvmm: error: mode dirty-bitmap is not enabled, use other method instead."),
        ("echo hi", None),
    ]  # fmt: skip
