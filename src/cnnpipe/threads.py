"""How many CPU threads torch uses in a cnnpipe training process (`trainer.threads`; issue #15 item 5).

`trainer.threads: N` (N > 0) is used as given. `0` (the default) is automatic:

1. `OMP_NUM_THREADS` from the environment, when set to a positive number: the user's (or torchrun's) explicit
   choice wins over any guess of ours; with several processes of the run on this host it only caps their
   share (2 below), so an exported `OMP_NUM_THREADS=2` on 2 cores does not give 2 sweep workers 2 threads each;
2. otherwise the usable cores (this process's CPU affinity) minus one, divided among the training processes
   the project itself starts on this host, and at least 1. Those processes are the local DDP ranks
   (`LOCAL_WORLD_SIZE`, set by torchrun; else `trainer.devices`, Lightning's launcher starting one process per
   device) or, for sweep workers, `sweep.workers` (the sweep stage passes each worker its share).

Why one core is left out: torch's OpenMP thread team is fork-join, every parallel region ends when its slowest
thread does. When another process takes one of the team's cores, that thread gets a time slice now and then and
the whole team waits for it at every operator: on this project's small CNNs a 2-thread process on 2 cores ran
3-44 steps/s beside one busy single-thread process and 3-14 beside a twin of itself, against 54-115 and 58-81
for 1 thread (docs/benchmarks.md, "Threads beside a busy neighbour"). Neither libgomp's passive wait
(`OMP_WAIT_POLICY=PASSIVE`) nor a shorter spin (`GOMP_SPINCOUNT`) fixes it: the wait is for a descheduled
thread, not a spinning one, and the passive policy made a lone 2-thread run 2.5x slower on these tiny operators.
A team one core smaller than the machine keeps a core for everything else (a neighbour, the stage process of
a sweep, DVC, MLflow), at the price of that core when the machine is idle (on 2 cores: 1 thread instead of 2).

No environment variable is set before torch is imported: the thread count is applied with
`torch.set_num_threads` when the Trainer is built, which also sets OpenMP's and MKL's. Inter-op threads (torch's
separate pool for `torch.jit.fork`-style parallelism) are left at torch's default: the training step does not
use them, and they can be set only once per process.
"""

from __future__ import annotations

import os

from cnnpipe.config import Config
from cnnpipe.console import info

RESERVED_CORES = 1  # left to other processes when the thread count is automatic

_reported: set[tuple[int, str]] = set()  # (threads, reason) lines printed by this process


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cgroup cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes(cfg: Config) -> int:
    """Training processes of this run on this host: the local DDP ranks (1 without DDP)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    return max(1, cfg.trainer.devices)


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def thread_choice(cfg: Config, processes: int | None = None) -> tuple[int, str]:
    """(threads, why): see the module's docstring. `processes` overrides the count of local processes (the
    sweep stage passes `sweep.workers`)."""
    if cfg.trainer.threads:
        return cfg.trainer.threads, "trainer.threads"
    cores = usable_cores()
    procs = max(1, processes if processes is not None else local_processes(cfg))
    share = max(1, (cores - RESERVED_CORES) // procs)
    env = _env_threads()
    if env is not None and (procs == 1 or env <= share):
        return env, "OMP_NUM_THREADS"
    who = f", {procs} processes of this run" if procs > 1 else ""
    return share, f"auto: {cores} cores, {RESERVED_CORES} left for other processes{who}"


def cpu_threads(cfg: Config, processes: int | None = None) -> int:
    """The torch CPU threads for one training process of this run."""
    return thread_choice(cfg, processes)[0]


def apply(cfg: Config, label: str = "train", say: bool = True) -> int:
    """Set torch's CPU threads for this process and, with `say` (when a Trainer is built), say so once: a stage
    that stops on bad input prints its one error line and nothing else."""
    import torch

    threads, why = thread_choice(cfg)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if say and (threads, why) not in _reported:
        _reported.add((threads, why))
        info(label, f"torch threads: {torch.get_num_threads()} of {usable_cores()} cores ({why})")
    return threads
