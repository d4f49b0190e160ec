"""The control loop: one thread runs every state change; signals only write to a pipe.

Deterministic: threads hand work to a loop running in the test, no sleeps decide anything.
"""

from __future__ import annotations

import signal
import threading

import pytest

from pyvmm.monitor.control import ControlLoop, LoopClosed


def serve(loop: ControlLoop) -> tuple[threading.Thread, threading.Event]:
    """Run `loop` on a thread until the returned event is set."""
    done = threading.Event()
    thread = threading.Thread(target=loop.run, args=(done.is_set,), daemon=True)
    thread.start()
    return thread, done


def test_work_runs_on_the_loop_thread_one_piece_at_a_time() -> None:
    loop = ControlLoop()
    thread, done = serve(loop)
    inside = []
    overlaps = []
    ran_on = set()
    lock = threading.Lock()

    def work(i: int) -> int:
        ran_on.add(threading.get_ident())
        with lock:
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(list(inside))
        for _ in range(1000):  # give another thread a chance to interleave, if it could
            pass
        with lock:
            inside.remove(i)
        return i * 2

    results: list[int] = []
    callers = [
        threading.Thread(target=lambda i=i: results.append(loop.call(lambda: work(i))))
        for i in range(40)
    ]
    for c in callers:
        c.start()
    for c in callers:
        c.join(10)
    done.set()
    thread.join(5)
    loop.close()
    assert sorted(results) == [i * 2 for i in range(40)]
    assert ran_on == {thread.ident}
    assert overlaps == []


def test_an_exception_goes_back_to_the_caller() -> None:
    loop = ControlLoop()
    thread, done = serve(loop)

    def fail() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        loop.call(fail)
    assert loop.call(lambda: 5) == 5  # the loop goes on
    done.set()
    thread.join(5)
    loop.close()


def test_a_call_on_the_loop_thread_runs_at_once() -> None:
    loop = ControlLoop()
    thread, done = serve(loop)
    assert loop.call(lambda: loop.call(lambda: "nested")) == "nested"
    done.set()
    thread.join(5)
    loop.close()


def test_nested_signals_are_each_delivered_once_per_kind_and_take_no_lock() -> None:
    """A handler interrupted by another signal (the deadlock of a lock-taking handler):
    here the handler is entered 300 times, nested, as CPython would run them."""
    loop = ControlLoop()
    seen: list[int] = []
    loop.on_signal = seen.append

    def nested(depth: int) -> None:
        loop._on_signal(signal.SIGTERM, None)
        if depth:
            nested(depth - 1)
            loop._on_signal(signal.SIGINT, None)

    nested(150)
    assert loop.run(lambda: bool(seen), timeout_s=5)
    assert seen == [signal.SIGTERM, signal.SIGINT]  # one action per signal kind per wake
    loop.close()


def test_after_close_work_is_refused_and_signals_are_ignored() -> None:
    loop = ControlLoop()
    loop.close()
    with pytest.raises(LoopClosed):
        loop.call(lambda: 1)
    loop._on_signal(signal.SIGTERM, None)  # no exception, no write to a closed fd


def test_close_fails_the_work_still_queued() -> None:
    loop = ControlLoop()
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            loop.call(lambda: 1)
        except LoopClosed as exc:
            errors.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    while not loop._queue:  # the call is queued (nobody serves the loop)
        pass
    loop.close()
    t.join(5)
    assert len(errors) == 1


def test_run_returns_false_at_its_timeout() -> None:
    loop = ControlLoop()
    assert loop.run(lambda: False, timeout_s=0.05) is False
    loop.close()


def test_a_signal_tripped_as_close_ignores_it_prints_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPython reports a signal that tripped while close() swapped its handler to SIG_IGN
    as an unraisable OSError with a traceback (seen in 300-signal bursts); a VMM that is
    exiting drops that one report, and only that one."""
    import sys
    import types

    seen: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: seen.append(str(report.exc_value)))
    loop = ControlLoop()
    loop.after_close = signal.SIG_IGN
    loop.install_signal_handlers((signal.SIGUSR2,))
    loop.close()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)

    def report(message: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(exc_value=OSError(message))

    sys.unraisablehook(report("Signal 12 ignored due to race condition"))
    sys.unraisablehook(report("something else"))
    assert seen == ["something else"]
