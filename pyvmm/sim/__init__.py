"""pyvmm sim: pyvmm's own pre-copy loop and convergence policies on a virtual clock, against
a modelled guest and link (docs/sim.md).

- model.py: the model's parameters (what is not in the bench scenario);
- guest.py: vCPUs writing their working sets, throttle sleeps on their time, the dirty log;
- link.py: the wire (bandwidth, latency, zero pages) behind a PageWriter's interface;
- engine.py: one simulated migration, start to finish, as a bench report;
- comparisons.py, batch.py: named comparisons (series-2024-full, beyond the series);
- calibrate.py: real runs beside simulated ones;
- cli.py: `pyvmm sim ...`.

Nothing here decides anything a migration decides: Precopy, DirtyPages and the policies
are imported from pyvmm.migration and run unchanged.
"""
