"""Latency of one gloo all-reduce between 2 CPU processes on this machine (context for B7, not in run_all).

DDP all-reduces the gradients once per step; when that costs as much as the step's compute, 2 processes
cannot beat one. Prints the mean time of 300 all-reduces per tensor size after 20 warm-up calls.

Run: python -m bench.gloo_latency
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = (5_000, 50_000, 500_000)  # float32 elements: 20 KB (B7's cnn has ~30k parameters), 200 KB, 2 MB


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for size in SIZES:
        t = torch.ones(size)
        for _ in range(20):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(300):
            dist.all_reduce(t)
        per_call = (time.perf_counter() - start) / 300
        if rank == 0:
            print(f"gloo all-reduce of {size * 4 / 1e3:,.0f} KB between 2 processes: {per_call * 1e3:.3f} ms")
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
