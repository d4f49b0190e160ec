"""Shared fixtures, and the one rule for tests that need something from the machine.

A test that needs /dev/kvm, QEMU or network namespaces skips where that is missing,
naming what is missing, except under CI (`CI=true`), where it fails: .ci/run installs
QEMU and iproute2, and a CI machine without KVM cannot test pyvmm.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
QEMU_BINARY = "qemu-system-x86_64"


def require(reason: str | None, *, optional: bool = False) -> bool:
    """Go on if `reason` is None (what the test needs is there) and return True.

    Otherwise fail under CI; elsewhere skip naming the reason, or with optional=True
    return False, for a test that can still run a smaller version of itself.
    """
    if reason is None:
        return True
    if IN_CI:
        pytest.fail(f"CI=true but {reason}: under CI this is a failure, not a skip")
    if optional:
        return False
    pytest.skip(reason)


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else the reason."""
    path = Path("/dev/kvm")
    if not path.exists():
        return "/dev/kvm does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def qemu_missing() -> str | None:
    """None if QEMU is installed, else the reason."""
    if shutil.which(QEMU_BINARY):
        return None
    return f"{QEMU_BINARY} is not on PATH (Debian package qemu-system-x86; .ci/run installs it)"


def netns_missing() -> str | None:
    """None if network namespaces with shaped veth links can be made here, else why not."""
    from pyvmm.bench import netns

    reason = netns.unavailable()
    if reason is None:
        return None
    return f"{reason} (the shaped-link tests need them; .ci/run installs iproute2)"


@pytest.fixture(scope="session")
def require_kvm() -> None:
    require(kvm_usable())


@pytest.fixture
def qemu_binary() -> str:
    """The path of qemu-system-x86_64 (skip without it; under CI, fail)."""
    require(qemu_missing())
    path = shutil.which(QEMU_BINARY)
    assert path is not None
    return path


@pytest.fixture
def require_netns() -> None:
    require(netns_missing())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests marked `kvm` get the require_kvm fixture automatically.
    for item in items:
        if item.get_closest_marker("kvm") is not None:
            item.fixturenames.insert(0, "require_kvm")
    # The long tests first (a stable sort: the same order on every worker), so that the
    # workers end on short ones; `--dist worksteal` (pyproject) lets an idle worker take
    # half of a busy one's queue, as xdist hands each worker one consecutive chunk first.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# --- several workers (pytest-xdist, pyproject's addopts) ------------------------------------------
# Most tests wait (on a paced guest, a capped link, QEMU's start), so several run at once. A test
# that measures a rate or a time against the machine's speed is marked `exclusive` and runs
# alone: a readers-writer lock over every test, shared by the workers through a file in
# their common base directory. An exclusive test first takes the turnstile, so that a test
# starting meanwhile waits behind it instead of starving it.


@pytest.fixture(autouse=True)
def _machine_share(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: nothing runs beside us
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # .../pytest-N, above each popen-gwK
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with (
        open(shared / "turnstile.lock", "a") as turnstile,
        open(shared / "machine.lock", "a") as machine,
    ):
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)
