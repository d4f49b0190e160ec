"""One view per tracker user: a migration's pending clears are invisible to other users."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from vmproc import vm_process

import guestgen
from pyvmm.dirty import bitmap as bitmap_mod
from pyvmm.dirty.bitmap import BitmapTracker
from pyvmm.dirty.factory import make_tracker
from pyvmm.dirty.scan import bitmap_to_pages
from pyvmm.dirty.tracker import DirtyView
from pyvmm.machine.devices import SerialConsole
from pyvmm.machine.elf import parse_pvh_image
from pyvmm.machine.machine import Machine, MachineConfig

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


# --- the view rules, in-process and deterministic --------------------------------------------

PAGE = 4096


def bitmap_machine(mem_mib: int, code: bytes) -> Machine:
    config = MachineConfig(mem_mib << 20, 1, "", dirty_ring_entries=None)
    machine = Machine(config, SerialConsole(io.StringIO()))
    machine.boot(parse_pvh_image(guestgen.make_elf(code)))
    return machine


def pages_of(view: DirtyView, slot: int = 0) -> set[int]:
    return {int(p) for p in bitmap_to_pages(view.bitmaps[slot])}


def forget(view: DirtyView) -> None:
    """What a user does once it has dealt with its pages (sent, counted)."""
    with view.lock:
        for bitmap in view.bitmaps:
            bitmap.fill(0)


def manual_protect_tracker(machine: Machine) -> BitmapTracker:
    tracker = make_tracker(machine)
    assert isinstance(tracker, BitmapTracker)
    if not tracker.manual_protect:
        tracker.close()
        pytest.skip("this host's KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET")
    return tracker


def test_a_page_another_view_defers_is_not_new_twice() -> None:
    with bitmap_machine(32, guestgen.CLI_HLT) as machine:
        tracker = manual_protect_tracker(machine)
        a = tracker.open_view("a", defer_clear=True)
        b = tracker.open_view("b", defer_clear=True)
        everything = a.sync()  # INITIALLY_SET: every page, handed to both views
        assert everything == machine.memory.regions[0].pages
        assert b.sync() == everything  # handed over by a's sync; KVM still holds them all
        forget(a)
        forget(b)
        # Nobody re-armed them: KVM reports them again, but neither view is told twice.
        assert a.sync() == b.sync() == 0
        assert not pages_of(a) and not pages_of(b)
        assert tracker.stale_pages() == everything
        # A view that opens now is told at once: the guest writes these pages unseen.
        c = tracker.open_view("c")
        assert pages_of(c) == set(range(everything))
        assert c.sync() == everything
        assert tracker.stale_pages() == 0  # c is eager: its sync re-armed everything
        forget(c)
        assert c.sync() == a.sync() == b.sync() == 0
        tracker.close()


def test_an_eager_view_sees_writes_to_pages_a_migration_has_not_sent() -> None:
    written = [0x300, 0x301, 0x1500]
    with bitmap_machine(32, guestgen.write_pages([p * PAGE for p in written])) as machine:
        tracker = manual_protect_tracker(machine)
        migration = tracker.open_view("migration", defer_clear=True, initially_dirty=True)
        assert migration.defer_clear
        assert migration.sync() == 0  # already all dirty: nothing is newly set
        assert tracker.stale_pages() == machine.memory.regions[0].pages  # all deferred
        rate = tracker.open_view("calc-dirty-rate")
        rate.sync()  # told about every deferred page; re-arms them (QEMU's reset_protect)
        forget(rate)
        machine.start()
        assert machine.wait(20).reason == "all vCPUs halted"
        assert rate.sync() == len(written)
        assert pages_of(rate) == set(written)
        assert migration.sync() == 0  # still waiting to send every page: nothing new
        rate.close()
        # Alone again, the migration defers: what it reports stays stale until before_copy.
        forget(migration)
        machine.memory.write(0x400 * PAGE, b"pyvmm")  # pyvmm's own write reaches it too
        assert migration.sync() == 1 and pages_of(migration) == {0x400}
        tracker.close()


def test_another_views_harvest_reaches_a_migration_only_at_its_own_sync() -> None:
    """QEMU's order: the dirty limit's (or calc-dirty-rate's) log sync fills the global
    dirty bitmap, and a migration's bitmap takes it at its next migration_bitmap_sync.
    A page harvested by another view between two migration syncs must not appear in the
    migration's bitmap before the migration syncs (it would be sent in the current pass)."""
    written = [0x300, 0x301, 0x1500]
    with bitmap_machine(32, guestgen.write_pages([p * PAGE for p in written])) as machine:
        tracker = make_tracker(machine)
        migration = tracker.open_view("migration", defer_clear=True)
        stat = tracker.open_view("dirty-limit")
        migration.sync()
        stat.sync()
        forget(migration)
        forget(stat)
        machine.start()
        assert machine.wait(20).reason == "all vCPUs halted"
        assert stat.sync() == len(written)  # the other view harvests them...
        assert pages_of(migration) == set()  # ...and the migration does not see them yet
        assert migration.sync() == len(written)  # its own sync takes them, counted once
        assert pages_of(migration) == set(written)
        assert migration.sync() == 0 and stat.sync() == 0
        tracker.close()


def test_before_copy_rearms_the_whole_1gib_chunk_and_only_stale_pages() -> None:
    chunk = bitmap_mod.CLEAR_CHUNK_PAGES
    low, high = 0x2000, chunk + 0x2000  # one page in each of the two chunks
    with bitmap_machine(1536, guestgen.write_pages([low * PAGE, high * PAGE])) as machine:
        tracker = manual_protect_tracker(machine)
        pages = machine.memory.regions[0].pages
        migration = tracker.open_view("migration", defer_clear=True, initially_dirty=True)
        watcher = tracker.open_view("watcher", defer_clear=True)
        migration.sync()
        assert watcher.sync() == pages
        forget(watcher)
        migration.before_copy(0, 10, 1)  # about to send page 10: re-arms chunk 0
        assert tracker.stale_pages() == pages - chunk and tracker.clears == 1
        migration.before_copy(0, 12, 1)  # nothing stale left there: no ioctl
        assert tracker.clears == 1
        machine.start()
        assert machine.wait(20).reason == "all vCPUs halted"
        # The write to chunk 1 hit a page KVM still held dirty: it made no new report.
        # Both views were told about that page at the first sync; the watcher dropped it.
        assert watcher.sync() == 1 and pages_of(watcher) == {low}
        migration.before_copy(0, high, 1)
        assert tracker.stale_pages() == 1  # the low page, reported again just now
        tracker.close()
