"""One view per tracker user: a migration's pending clears are invisible to other users."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from vmproc import vm_process

pytestmark = pytest.mark.kvm

# One vCPU that writes one word into each page of its 32 MiB, flat out; the test stops it
# once it has filled them all, so the migration has 32 MiB of non-zero pages to send. The
# slot is larger than one 1 GiB clear chunk: the migration's first send re-arms the first
# chunk, the rest stays deferred until the migration gets there.
MEM = ["--mem", "1536M"]
FILL = ["memstress", *MEM, "--append", "mb=32"]


@pytest.mark.parametrize(
    ("tracking", "modes"),
    [("bitmap", ["dirty-bitmap", "page-sampling"]), ("ring", ["dirty-ring", "page-sampling"])],
)
def test_idle_guest_reads_zero_while_a_migration_holds_unsent_pages(
    tmp_path: Path, tracking: str, modes: list[str]
) -> None:
    """A stopped guest writes nothing. The migration's first sync found every page dirty;
    at 1 MiB/s it has sent almost none of them. A short calc-dirty-rate must still read
    ~0 MiB/s: pages the migration has not re-armed yet are not new writes."""
    ring = ["--dirty-ring"] if tracking == "ring" else []
    uri = f"unix:{tmp_path}/mig.sock"
    with (
        vm_process(tmp_path, "dst", [*MEM, "--incoming", uri, "-S", *ring]),
        vm_process(tmp_path, "src", [*FILL, *ring]) as src,
    ):
        src.wait_line("mib=", 20, after=1)  # a second of writing: every page written
        with src.qmp() as q:
            q.execute("stop")
            q.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
            q.execute("migrate", {"uri": uri})
            deadline = time.monotonic() + 20
            while q.execute("query-migrate")["status"] != "active":
                assert time.monotonic() < deadline, "the migration never became active"
                time.sleep(0.02)
            for mode in modes:
                for calc_time_ms in (100, 300):
                    q.execute(
                        "calc-dirty-rate",
                        {"calc-time": calc_time_ms, "calc-time-unit": "millisecond", "mode": mode},
                    )
                    deadline = time.monotonic() + 10
                    while (info := q.execute("query-dirty-rate"))["status"] != "measured":
                        assert time.monotonic() < deadline, f"{mode}: no result"
                        time.sleep(0.02)
                    assert info["dirty-rate"] <= 1, f"{mode} over {calc_time_ms} ms: {info}"
            migration = q.execute("query-migrate")
            assert migration["status"] == "active", migration
            # Most of RAM is still waiting to be sent (the view is really held open).
            assert migration["ram"]["remaining"] > 16 << 20, migration
            q.execute("migrate_cancel")
