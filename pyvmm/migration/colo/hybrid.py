"""Hybrid mode: when the primary checkpoints, and whether the next checkpoint is COLO or
passive. A restatement of the ORBIT branch's migration/colo.c (github orbitfp7/qemu,
branch orbit-wp4-colo-mar16, commits 248641d03 "COLO: Hybrid mode" and 11a0cc336 "COLO:
Minimum checkpoint time"): colo_process_checkpoint's loop and checkpoint_to_passive_mode.

Per turn of the loop (ColoPrimary.run drives it):
1. limit = colo-passive-time while passive, else x-colo-max-time;
2. wait for a miscompare (or an old answer's timeout) for at most limit minus the time
   since the last checkpoint ended;
3. length = now - end of the last checkpoint (the RFC's "checkpoint length": how long the
   VMs ran, not how long a checkpoint takes); on a miscompare the relax wait is
   x-colo-min-time - length (at least 0), spent after the request is sent;
4. mean = 0.7 mean + 0.3 length ("a current guess which seems to work well"), samples + 1;
5. decide (checkpoint_to_passive_mode): while passive_left > 0 it counts down and stays
   passive, and when it reaches 0 the mean and samples are reset and the checkpoint is
   COLO again; in COLO mode nothing is decided before 5 samples, then passive when the
   mean is below colo-passive-limit (passive_left = colo-passive-count).

So a switch to passive gives colo-passive-count passive checkpoints; then the reset one
and 4 more are COLO (the "5 COLO cycles"), and the fifth sample decides again.
Everything here is plain data: no clock, no thread, no socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MEAN_OLD = 0.7  # ORBIT's weights, "a current guess"
MEAN_NEW = 0.3
MIN_SAMPLES = 5  # COLO cycles before the mean is trusted

COLO, PASSIVE = "colo", "passive"


@dataclass(frozen=True)
class ColoTimes:
    """The parameters hybrid mode reads, in ms (and a count), taken at each turn."""

    max_time_ms: int = 10000  # x-colo-max-time (x-checkpoint-delay)
    min_time_ms: int = 3  # x-colo-min-time: the relax wait after a miscompare
    passive_count: int = 100  # colo-passive-count
    passive_limit_ms: int = 400  # colo-passive-limit
    passive_time_ms: int = 250  # colo-passive-time

    @classmethod
    def from_settings(cls, values: Any) -> ColoTimes:
        return cls(
            int(values["x-colo-max-time"]),
            int(values["x-colo-min-time"]),
            int(values["colo-passive-count"]),
            int(values["colo-passive-limit"]),
            int(values["colo-passive-time"]),
        )


@dataclass(frozen=True)
class Decision:
    """What the next checkpoint is, and why the mode is what it is."""

    passive: bool
    change: str | None = None  # "to-passive", "to-colo", or None (no change)

    @property
    def mode(self) -> str:
        return PASSIVE if self.passive else COLO


class HybridMode:
    """ORBIT's passive_count, colo_checkpoint_time_mean and colo_checkpoint_time_count."""

    def __init__(self) -> None:
        self.passive_left = 0
        self.mean_ms = 0.0
        self.samples = 0

    @property
    def passive(self) -> bool:
        """The last checkpoint was passive (and more are to come)."""
        return self.passive_left > 0

    def limit_ms(self, times: ColoTimes) -> int:
        """The longest wait for a trigger this turn, from the end of the last checkpoint."""
        return times.passive_time_ms if self.passive_left else times.max_time_ms

    @staticmethod
    def relax_ms(times: ColoTimes, length_ms: float, miscompare: bool) -> float:
        """The extra wait after the request when checkpoints come too fast."""
        if not miscompare:
            return 0.0
        return max(0.0, times.min_time_ms - length_ms)

    def record(self, length_ms: float) -> None:
        """A checkpoint is due after the VMs ran length_ms: fold it into the mean."""
        self.mean_ms = self.mean_ms * MEAN_OLD + MEAN_NEW * length_ms
        self.samples += 1

    def decide(self, times: ColoTimes) -> Decision:
        """checkpoint_to_passive_mode: is the checkpoint about to start passive?"""
        if self.passive_left:
            self.passive_left -= 1
            if self.passive_left:
                return Decision(True)
            self.mean_ms = 0.0
            self.samples = 0
            return Decision(False, "to-colo")
        if self.samples < MIN_SAMPLES:
            return Decision(False)
        if self.mean_ms < times.passive_limit_ms:
            # As in ORBIT, a count of 0 still makes this one checkpoint passive.
            self.passive_left = times.passive_count
            return Decision(True, "to-passive")
        return Decision(False)
