"""multifd: RAM pages over several connections beside the main stream (QEMU's multifd
capability, migration/multifd.c), one sender thread and one receiver thread per channel.

- wire.py: the channel handshake (MULTIFD on the main stream, a preamble and a CHANNEL
  record on each channel, CHANNELS_READY back on the main stream);
- barrier.py: the ordering rule at sync points, as a state machine and as a barrier;
- send.py: the channels' sender threads and the page writer that hands them tables;
- recv.py: the destination's channel receivers.

docs/migration-stream.md ("multifd channels") has the bytes; docs/migration.md the why.
"""
