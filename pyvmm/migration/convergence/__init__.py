"""Convergence policies: what a migration does when the guest dirties memory too fast.

Each policy is one class implementing the source's ConvergencePolicy hooks
(on_setup, on_sync, on_end); a research user adds a policy by writing one more.
See docs/convergence.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyvmm.migration.policy import ConvergencePolicy


def build_policies(caps: dict[str, bool], dirty_limit: Any = None) -> list[ConvergencePolicy]:
    """The policies the enabled capabilities ask for (QEMU allows one of the two)."""
    policies: list[ConvergencePolicy] = []
    if caps.get("auto-converge"):
        from pyvmm.migration.convergence.autoconverge import AutoConverge

        policies.append(AutoConverge())
    if caps.get("dirty-limit"):
        from pyvmm.migration.convergence.dirtylimit import DirtyLimitPolicy

        policies.append(DirtyLimitPolicy(dirty_limit))
    return policies
