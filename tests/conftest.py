"""Shared fixtures. KVM tests skip without /dev/kvm, except under CI where that fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else the reason."""
    path = Path("/dev/kvm")
    if not path.exists():
        return "/dev/kvm does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture(scope="session")
def require_kvm() -> None:
    reason = kvm_usable()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}: KVM tests cannot run")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests marked `kvm` get the require_kvm fixture automatically.
    for item in items:
        if item.get_closest_marker("kvm") is not None:
            item.fixturenames.insert(0, "require_kvm")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (fails under CI=true)")
    config.addinivalue_line("markers", "slow: takes tens of seconds (deselect with -m 'not slow')")
