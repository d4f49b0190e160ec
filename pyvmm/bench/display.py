"""What a run shows while it runs: a live panel on a terminal, plain lines otherwise,
nothing with --quiet. Everything goes to stderr; stdout may carry the JSON report."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

MIB = 1 << 20


def describe(sample: dict[str, Any]) -> str:
    """One progress sample in one line."""
    ram = sample["ram"]
    text = (
        f"{sample['elapsed']:6.1f} s  {sample['status']:<9} iter {ram['dirty_sync_count']:<3}"
        f" remaining {ram['remaining'] / MIB:8.1f} MiB  sent {ram['transferred'] / MIB:8.1f} MiB"
        f"  {ram['mbps']:7.1f} Mbit/s  dirty {ram['dirty_pages_rate'] * 4096 / MIB:7.1f} MiB/s"
    )
    if sample["throttle_pcent"]:
        text += f"  throttle {sample['throttle_pcent']}%"
    if sample["dirty_limit_throttle_time_per_round"]:
        text += f"  dirty-limit sleep {sample['dirty_limit_throttle_time_per_round']} us"
    return text


class Display(Protocol):
    def phase(self, text: str) -> None: ...
    def progress(self, sample: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class Quiet:
    def phase(self, text: str) -> None:
        pass

    def progress(self, sample: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Plain:
    """guestperf --verbose style: phases, and a progress line about once a second."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.last = 0.0

    def phase(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def progress(self, sample: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s or sample["status"] != "active":
            self.last = now
            print("  " + describe(sample), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class Live:
    """A rich live panel: the phase, the latest sample, and the recent iterations."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live as RichLive

        self.console = Console(stderr=True)
        self.live = RichLive(console=self.console, refresh_per_second=8, transient=False)
        self.live.start()
        self.phases: list[str] = []
        self.sample: dict[str, Any] | None = None

    def _render(self) -> Any:
        from rich.table import Table

        table = Table.grid(padding=(0, 1))
        for text in self.phases[-6:]:
            table.add_row(f"[bold]{text}")
        if self.sample:
            table.add_row(describe(self.sample))
        return table

    def phase(self, text: str) -> None:
        self.phases.append(text)
        self.live.update(self._render())

    def progress(self, sample: dict[str, Any]) -> None:
        self.sample = sample
        self.live.update(self._render())

    def close(self) -> None:
        self.live.stop()


def make_display(quiet: bool) -> Display:
    if quiet:
        return Quiet()
    return Live() if sys.stderr.isatty() else Plain()
