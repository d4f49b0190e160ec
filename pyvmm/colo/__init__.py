"""COLO's network side and its demo, apart from any VM process (the comparator must
survive the primary: it is the network). It talks to the VMs over sockets and QMP only.

- compare.py  the comparator's rules (mirror, compare, hold, release, replay): pure logic
- proxy.py    the comparator process: client, VM and control sockets around compare.py
- client.py   a load client that checks every answer (no gap, no duplicate, consistent)
- demo.py     `pyvmm colo`: the RFC's demo on one machine, phase by phase

docs/colo.md explains how they fit together.
"""
