"""Test helpers: run the pyvmm CLI as a real process, and clean it up whatever happens."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PYVMM = [sys.executable, "-m", "pyvmm.cli"]


def run_pyvmm(args: Sequence[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYVMM, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


@contextmanager
def pyvmm_process(
    args: Sequence[str], prefix: Sequence[str] = (), **kwargs: object
) -> Iterator[subprocess.Popen[str]]:
    """A background `pyvmm ...` (optionally behind a prefix such as `ip netns exec NS`);
    killed by its pid when the block ends."""
    proc = subprocess.Popen(
        [*prefix, *PYVMM, *args],
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        text=True,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def wait_for_path(path: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)


def wait_for_line(path: Path, needle: str, timeout_s: float = 10.0) -> str:
    """Wait until a line containing `needle` appears in a (serial) file; return it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if needle in line:
                    return line
        time.sleep(0.05)
    raise TimeoutError(f"no line with {needle!r} in {path} within {timeout_s} s")


def open_fds() -> int:
    """This process's open fds, after a collection: an object an earlier test dropped
    would otherwise close its fd whenever the collector runs, in the middle of a count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def one_line_error(stderr: str) -> str:
    """The stderr of a failed command must be one `pyvmm: error:` line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("pyvmm: error:")]
    assert len(errors) == 1, stderr
    return errors[0]
