"""COLO: coarse-grained lock-stepping fault tolerance, with the 2015 hybrid mode.

After an ordinary pre-copy migration (with the x-colo capability) both VMs run, and the
primary takes checkpoints on the same connection. One module per job:

- hybrid.py       when to checkpoint and in which mode (COLO or passive): the ORBIT
                  branch's logic as plain data, testable on a virtual clock
- checkpoint.py   the primary's side of one checkpoint, step by step (request/answer)
- primary.py      the primary's loop: triggers, relax time, modes, failover
- secondary.py    the secondary's loop: receive, apply atomically, answer
- ramcache.py     the secondary's copy of the primary's RAM, and the atomic apply
- protocol.py     the order of COLO records, checked by the receiver
- notify.py       the primary's link to the comparator (checkpoints, releases, requests)
- status.py       query-colo-status and failover states (QEMU's names)
- stats.py        x-query-colo-stats: per-checkpoint records and totals

docs/colo.md explains COLO, Remus and hybrid mode; docs/migration-stream.md the records.
"""
