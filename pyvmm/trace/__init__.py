"""`pyvmm trace`: watch a VMM's KVM ioctls from outside, with python-ptrace.

Top layer: it reads pyvmm/kvm's ABI tables and nothing else of pyvmm, and the VMM never
imports it. Only pyvmm.trace.ptracer imports python-ptrace (GPL-2.0, the optional
`trace` extra); its timelines are written with pyvmm.timeline, the standard-library-only
Trace Event Format writer every layer may use. docs/trace.md explains how it works.
"""
