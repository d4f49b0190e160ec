"""pyvmm: a KVM virtual machine monitor in Python for live-migration research.

The package is layered (see docs/architecture.md): kvm (L0, the ABI), machine
(L1, a runnable VM), dirty (L2, dirty tracking), migration (L3), monitor (L4,
QMP), and cli.py on top. Importing pyvmm itself stays cheap.
"""

__version__ = "0.1.0"
