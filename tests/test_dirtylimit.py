"""The dirty limit (QEMU 8.1's per-vCPU dirty-rate throttle): its controller arithmetic, a
limited writer next to a free reader, a dirty-limited live migration, and the refusals.

How the writer's rate is judged: from the guest's own `mib=` progress lines. memstress
(pattern=word) stores once per page, so MiB written per second is MiB dirtied per second
whenever no page is rewritten within a measurement period, which holds here: limited to
~50 MB/s, one pass over its 256 MiB takes about five seconds. That is independent of the
controller's own measurement (query-vcpu-dirty-limit's current-rate), which is checked too,
so the test would notice a controller that agrees with itself but not with the guest.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from vmproc import FINAL, VmProc, progress_by_vcpu, vm_process

from pyvmm.migration.convergence.dirtylimit import RingFullTime, adjust_throttle
from pyvmm.monitor.client import QmpCommandError

pytestmark = pytest.mark.kvm

LIMIT_MBPS = 50
TOLERANCE_MBPS = 25
NO_RING = "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set"


def rate_between(points: list[tuple[float, int]], t1: float, t2: float) -> float:
    """Units per second between the first and last progress line inside [t1, t2]."""
    inside = [(t, n) for t, n in points if t1 <= t <= t2]
    assert len(inside) >= 2, (t1, t2, points[-5:])
    (ta, na), (tb, nb) = inside[0], inside[-1]
    assert tb - ta >= 1.5, inside
    return (nb - na) / (tb - ta)


def refused(vm: VmProc, command: str, **args: object) -> str:
    with pytest.raises(QmpCommandError) as info:
        vm.cmd(command, **args)
    return str(info.value)


# --- the controller's arithmetic (no VM) ------------------------------------------------------


def test_controller_arithmetic_matches_qemu() -> None:
    # The worked example: 16 MiB ring (4096 entries), 100 MB/s measured, quota 10 MB/s.
    rft = RingFullTime()
    adj = adjust_throttle(0, 10, 100, lambda rate: rft(rate, 4096))
    assert (adj.rule, adj.ring_full_us, adj.sleep_pct, adj.new_us) == (
        "far-up",
        160_000,
        90,
        1_440_000,
    )
    # Within 25 MB/s: nothing changes, and the ring-full time is not even computed.
    assert adjust_throttle(7, 50, 74, lambda rate: rft(rate, 4096)).new_us == 7
    # Near (error <= 50 %): one tenth of the ring-full time, at the running max rate (100).
    near = adjust_throttle(1_000_000, 60, 100, lambda rate: rft(rate, 4096))
    assert (near.rule, near.new_us) == ("near-up", 1_000_000 + 16_000)
    # The running maximum never decreases: 40 MB/s still uses 100 MB/s's ring-full time.
    down = adjust_throttle(1_000_000, 100, 40, lambda rate: rft(rate, 4096))
    assert (down.rule, down.ring_full_us, down.sleep_pct) == ("far-down", 160_000, 60)
    assert down.new_us == 1_000_000 - 240_000
    # A guest that stopped dirtying sleeps no more; sleep is clamped to 99 ring-full times.
    assert adjust_throttle(5, 50, 0, lambda rate: rft(rate, 4096)).rule == "idle"
    huge = adjust_throttle(10**9, 1, 100, lambda rate: rft(rate, 4096))
    assert huge.clamped and huge.new_us == 99 * 160_000
    assert adjust_throttle(10, 100, 30, lambda rate: rft(rate, 4096)).new_us == 0


# --- a limited writer next to a free reader ---------------------------------------------------


def wait_writer_warm(vm: VmProc, timeout_s: float = 30) -> None:
    """The writer's first pass (fresh memory, slow on this host) is over."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        points = progress_by_vcpu(vm, "memstress").get(0, [])
        if len(points) >= 2 and points[-1][1] - points[-2][1] > 10_000:
            return
        time.sleep(0.2)
    raise TimeoutError("memstress's writer did not finish its first pass")


@pytest.mark.slow
def test_limit_slows_the_writer_and_not_the_reader(tmp_path: Path) -> None:
    args = ["memstress", "--vcpus", "2", "--mem", "1G", "--dirty-ring"]
    args += ["--append", "mb=256 readers=1"]
    with vm_process(tmp_path, "vm", args) as vm, vm.qmp() as q:
        wait_writer_warm(vm)
        q.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
        time.sleep(1.3)
        unlimited = q.cmd("query-dirty-rate")["vcpu-dirty-rate"]
        t_before = time.time()
        time.sleep(4.0)
        t_set = time.time()
        q.cmd("set-vcpu-dirty-limit", **{"dirty-rate": LIMIT_MBPS})
        current: list[tuple[float, int]] = []
        while time.time() < t_set + 11:
            time.sleep(0.5)
            limits = q.cmd("query-vcpu-dirty-limit")
            assert [(x["cpu-index"], x["limit-rate"]) for x in limits] == [(0, 50), (1, 50)]
            current.append((time.time() - t_set, limits[0]["current-rate"]))
        q.cmd("cancel-vcpu-dirty-limit")
        assert q.cmd("query-vcpu-dirty-limit") == []
        progress = progress_by_vcpu(vm, "memstress")
    # Five periods after the limit, the writer dirties within 25 MB/s of it.
    writer = rate_between(progress[0], t_set + 5, t_set + 11)
    controller = [rate for t, rate in current if t >= 5.5]
    controller_mean = sum(controller) / len(controller)
    reader_before = rate_between(progress[1], t_before, t_set)
    reader_after = rate_between(progress[1], t_set + 2, t_set + 11)
    print(
        f"unlimited vcpu rates {unlimited}; writer {writer:.0f} MiB/s from its mib= lines, "
        f"controller current-rate {controller} (mean {controller_mean:.0f}); reader "
        f"{reader_before:.0f} -> {reader_after:.0f} MiB read/s"
    )
    assert unlimited[0]["dirty-rate"] > LIMIT_MBPS + 2 * TOLERANCE_MBPS, unlimited
    assert abs(writer - LIMIT_MBPS) <= TOLERANCE_MBPS, writer
    assert abs(controller_mean - LIMIT_MBPS) <= TOLERANCE_MBPS, current
    # Only the writer is throttled: the reader keeps (at least) 90 % of its pace.
    assert reader_after >= 0.9 * reader_before, (reader_before, reader_after)


# --- a dirty-limited live migration -----------------------------------------------------------


THROTTLE_FIELD = "dirty-limit-throttle-time-per-round"
RING_FULL_FIELD = "dirty-limit-ring-full-time"


def dirty_limited_migration(src: VmProc, uri: str, cancel_when_limited: bool) -> dict:
    """Migrate with the dirty-limit capability; record query-migrate's two dirty-limit fields
    and what QMP's set/cancel answer while the limit is in service."""
    with src.qmp() as q:
        dirty_limit = [{"capability": "dirty-limit", "state": True}]
        q.cmd("migrate-set-capabilities", capabilities=dirty_limit)
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 20})
        q.cmd("migrate", uri=uri)
        seen: list[tuple[int, int]] = []
        refusals: list[str] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            info = q.cmd("query-migrate")
            if info["status"] in FINAL:
                break
            if THROTTLE_FIELD in info:
                seen.append((info[THROTTLE_FIELD], info[RING_FULL_FIELD]))
                if not refusals:  # QMP may not touch the limit the migration set
                    for command, args in (
                        ("set-vcpu-dirty-limit", {"dirty-rate": 1000}),
                        ("cancel-vcpu-dirty-limit", {}),
                    ):
                        with pytest.raises(QmpCommandError) as err:
                            q.execute(command, args)
                        refusals.append(str(err.value))
                if cancel_when_limited and info[THROTTLE_FIELD] > 0:
                    q.cmd("migrate_cancel")
            time.sleep(0.1)
        info["seen"], info["refusals"] = seen, refusals
        info["limits-after"] = q.cmd("query-vcpu-dirty-limit")
    return info


@pytest.mark.slow
def test_dirty_limited_migration_converges_and_memory_stays_intact(tmp_path: Path) -> None:
    """memverify rewrites 2 x 32 MiB flat out (far above 32 MiB/s), so every pass leaves the
    whole 64 MiB dirty, far above the 9.6 MB that 32 MiB/s x 300 ms allows: it cannot
    converge until the dirty limit (triggered on the second too-dirty period) throttles it.

    A first attempt is cancelled once the vCPUs sleep their (multi-second) penalties: the
    limit goes away with the migration and the guest resumes at once."""
    common = ["--vcpus", "2", "--mem", "128M", "--dirty-ring"]
    with vm_process(tmp_path, "src", ["memverify", *common, "--append", "mb=32"]) as src:
        src.wait_line("ok pages=", 20, after=3)
        with vm_process(tmp_path, "dst1", [*common, "--incoming", f"unix:{tmp_path}/m1"]):
            info = dirty_limited_migration(src, f"unix:{tmp_path}/m1", cancel_when_limited=True)
        assert info["status"] == "cancelled" and info["limits-after"] == [], info
        assert THROTTLE_FIELD not in info
        before = len(src.lines("ok pages="))
        src.wait_line("ok pages=", 3, after=before + 1)  # not asleep any more

        uri = f"unix:{tmp_path}/m2"
        with vm_process(tmp_path, "dst", [*common, "--incoming", uri]) as dst:
            info = dirty_limited_migration(src, uri, cancel_when_limited=False)
            assert info["status"] == "completed", info
            assert THROTTLE_FIELD not in info and info["limits-after"] == []  # cancelled
            print(
                f"migration: {info['total-time']} ms, downtime {info['downtime']} ms, "
                f"{info['ram']['dirty-sync-count']} syncs; (per-round, ring-full) us seen "
                f"{sorted(set(info['seen']))}"
            )
            assert any(per_round > 0 for per_round, _ in info["seen"]), info["seen"]
            set_refused, cancel_refused = info["refusals"]
            assert "can't set dirty page rate limit while migration is running" in set_refused
            assert "can't cancel dirty page rate limit while migration is running" in (
                cancel_refused
            )
            # The guest lives on at the destination, verifying what it wrote at the source.
            after = len(dst.lines("ok pages="))
            dst.wait_line("ok pages=", 10, after=after + 3)
            assert not dst.lines("CORRUPT") and dst.proc.poll() is None


# --- refusals, with QEMU's words --------------------------------------------------------------


def test_invalid_combinations_are_refused_like_qemu(tmp_path: Path) -> None:
    small = ["memstress", "--vcpus", "2", "--mem", "64M", "--append", "mb=4 rate=10"]
    with vm_process(tmp_path, "bitmap", small) as vm:
        dirty_limit = [{"capability": "dirty-limit", "state": True}]
        assert "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set" in (
            refused(vm, "migrate-set-capabilities", capabilities=dirty_limit)
        )
        assert NO_RING in refused(vm, "set-vcpu-dirty-limit", **{"dirty-rate": 10})
        assert vm.cmd("cancel-vcpu-dirty-limit") == {}  # QEMU: silently nothing
        assert vm.cmd("query-vcpu-dirty-limit") == []
    with vm_process(tmp_path, "ring", [*small, "--dirty-ring"]) as vm:
        both = [
            {"capability": "auto-converge", "state": True},
            {"capability": "dirty-limit", "state": True},
        ]
        conflict = "dirty-limit conflicts with auto-converge either enable one"
        assert conflict in refused(vm, "migrate-set-capabilities", capabilities=both)
        vm.cmd("migrate-set-capabilities", capabilities=both[1:])  # alone: fine
        assert conflict in refused(vm, "migrate-set-capabilities", capabilities=both[:1])
        period = "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"
        for bad in (0, 1001):
            assert period in refused(
                vm, "migrate-set-parameters", **{"x-vcpu-dirty-limit-period": bad}
            )
        limit = "Parameter 'vcpu_dirty_limit' expects is invalid, it must greater then 1 MB/s"
        assert limit in refused(vm, "migrate-set-parameters", **{"vcpu-dirty-limit": 0})
        ring = "Parameter 'x-vcpu-dirty-limit-ring-size' expects a power of two"
        assert ring in refused(
            vm, "migrate-set-parameters", **{"x-vcpu-dirty-limit-ring-size": 1000}
        )
        for index in (2, -1):
            for command in ("set-vcpu-dirty-limit", "cancel-vcpu-dirty-limit"):
                args = {"cpu-index": index, "dirty-rate": 10}
                if command.startswith("cancel"):
                    del args["dirty-rate"]
                assert "incorrect cpu index specified" in refused(vm, command, **args)
        uint64 = "Invalid parameter type for 'dirty-rate', expected: uint64"
        assert uint64 in refused(vm, "set-vcpu-dirty-limit", **{"dirty-rate": -1})
        # One vCPU; a zero rate cancels it, as in QEMU.
        vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 1, "dirty-rate": 30})
        assert vm.cmd("query-vcpu-dirty-limit") == [
            {"cpu-index": 1, "limit-rate": 30, "current-rate": 0}
        ]
        vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 1, "dirty-rate": 0})
        assert vm.cmd("query-vcpu-dirty-limit") == []
        assert vm.proc.poll() is None
