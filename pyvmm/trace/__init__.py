"""`pyvmm trace`: watch a VMM's KVM ioctls from outside, with python-ptrace.

Top layer: it reads pyvmm/kvm's ABI tables and nothing else of pyvmm, and the VMM never
imports it. Only pyvmm.trace.ptracer imports python-ptrace (GPL-2.0, the optional
`trace` extra); pyvmm.trace.timeline is a plain Trace Event Format writer that any
code can use. docs/trace.md explains how it works.
"""
