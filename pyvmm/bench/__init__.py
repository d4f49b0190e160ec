"""`pyvmm bench`: a guestperf-style migration benchmark harness for pyvmm and QEMU.

It sits above the monitor (L4): it starts VMM processes and drives them only over QMP,
so the same code measures pyvmm and QEMU. See docs/bench.md.
"""
