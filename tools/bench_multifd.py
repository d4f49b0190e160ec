#!/usr/bin/env python3
"""multifd throughput: a paused guest with --written-mib written (memverify filled it),
migrated at unlimited bandwidth over the main stream alone and over 1, 2 and 4 multifd
channels, beside loopback TCP with 1 and N plain Python streams measured in the same run
(a sender thread per stream: sendall of one buffer; a receiver thread per stream:
recv_into), each the best of --repeat runs.

Figure: ram.normal-bytes / total-time (tools/bench_migrate.py's figure 1), and the same per
channel; "setup" is setup-time (the channel handshake waits for the destination to build
its vCPUs).
Usage: python tools/bench_multifd.py [--written-mib 512] [--repeat 3] [--channels 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_migrate import UNLIMITED, migrate_once, throughput_gbs, warm_host_memory

GBIT_100_GBS = 12.5  # 100 Gbit/s in GB/s


def loopback_streams_gbs(streams: int, total_bytes: int = 1 << 30) -> float:
    """Aggregate GB/s of `streams` loopback TCP connections, each a sender thread doing
    sendall of one 8 MiB buffer and a receiver thread doing recv_into, total_bytes in all."""
    server = socket.create_server(("127.0.0.1", 0), backlog=streams)
    port = server.getsockname()[1]
    per_stream = total_bytes // streams
    buf = memoryview(bytearray(os.urandom(1 << 20) * 8))
    ready = threading.Barrier(2 * streams + 1)

    def sink() -> None:
        conn, _ = server.accept()
        dst = memoryview(bytearray(8 << 20))
        ready.wait()
        with conn:
            while conn.recv_into(dst):
                pass

    def source() -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            ready.wait()
            left = per_stream
            while left > 0:
                n = min(left, len(buf))
                conn.sendall(buf[:n])
                left -= n

    threads = [threading.Thread(target=sink) for _ in range(streams)]
    threads += [threading.Thread(target=source) for _ in range(streams)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    server.close()
    return per_stream * streams / elapsed / 1e9


def migrate_gbs(work: Path, written_mib: int, channels: int) -> tuple[float, dict]:
    params: dict = {"max-bandwidth": UNLIMITED}
    caps = {"multifd": channels > 0}
    if channels:
        params["multifd-channels"] = channels
    info = migrate_once("pyvmm", work, "memverify", written_mib + 128, f"mb={written_mib}",
                        r"ok pages=[1-9]", True, params, caps=caps)  # fmt: skip
    return throughput_gbs(info), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--written-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", default="1,2,4")
    args = parser.parse_args()
    counts = [int(c) for c in args.channels.split(",")]
    warm_host_memory(4)
    work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-multifd-"))
    print(f"host: {os.cpu_count()} CPUs; paused guest, {args.written_mib} MiB written, "
          f"best of {args.repeat}")  # fmt: skip
    print("\nloopback TCP, Python threads (sendall -> recv_into):")
    for streams in sorted({1, *counts}):
        best = max(loopback_streams_gbs(streams) for _ in range(args.repeat))
        print(f"  {streams} stream(s): {best:6.2f} GB/s  ({best / streams:.2f} GB/s per stream)")
    print("\npyvmm migration, normal-bytes / total-time:")
    per_channel = 0.0
    for channels in [0, *counts]:
        runs = [migrate_gbs(work, args.written_mib, channels) for _ in range(args.repeat)]
        best, info = max(runs, key=lambda r: r[0])
        name = "main stream only" if channels == 0 else f"multifd, {channels} channel(s)"
        extra = ""
        if channels:
            extra = f"  {best / channels:.2f} GB/s per channel"
            per_channel = max(per_channel, best / channels)
        print(f"  {name:<24} {best:6.2f} GB/s  total {info['total-time']} ms, "
              f"setup {info['setup-time']} ms, multifd-bytes "
              f"{info['ram']['multifd-bytes']}{extra}")  # fmt: skip
    if per_channel:
        need = GBIT_100_GBS / per_channel
        print(f"\n100 Gbit/s = {GBIT_100_GBS} GB/s: at the best per-channel rate here "
              f"({per_channel:.2f} GB/s) about {need:.0f} channels, each a sender thread on "
              "its own core at the source and a receiver thread on its own core at the "
              "destination (if the rate per channel held as channels and cores grow)")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
