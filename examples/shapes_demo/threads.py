"""How many torch threads the demo's base training uses on a CPU that other processes may share.

With two threads on two cores every parallel operator waits for its slower thread, so one other busy process makes
each step wait for a descheduled thread: the README's measurement on a 2-core machine shows two threads turn from
the fastest choice on an idle machine into the slowest one beside a single busy process. So the demo starts on as
many threads as there are cores that other processes leave idle, and drops to one thread if others start competing
while it trains. Float sums then split differently, so runs on different thread counts differ in the last bits and,
over hundreds of steps, in their numbers; a run on the same thread counts reproduces exactly (`--threads N` fixes it).
"""

import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

PROC_STAT = Path("/proc/stat")
# Other processes using at least this many cores' worth of CPU count as competition for a second thread.
BUSY_CORES = 0.5


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process together has spent busy since boot (Linux `/proc/stat`), None elsewhere."""
    if not PROC_STAT.is_file():
        return None
    fields = [int(value) for value in PROC_STAT.read_text().splitlines()[0].split()[1:]]
    idle, iowait = fields[3], fields[4] if len(fields) > 4 else 0
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


class OtherProcessesMeter:
    """Cores' worth of CPU that processes other than this one used since the last reading."""

    def __init__(self):
        self.last = self._read()

    @staticmethod
    def _read() -> tuple[float | None, float, float]:
        return busy_cpu_seconds(), time.process_time(), time.monotonic()

    def cores(self) -> float | None:
        (busy_before, own_before, wall_before), self.last = self.last, self._read()
        busy_now, own_now, wall_now = self.last
        if busy_before is None or busy_now is None or wall_now <= wall_before:
            return None
        return max(busy_now - busy_before - (own_now - own_before), 0.0) / (wall_now - wall_before)


def choose_threads(max_threads: int, sample_seconds: float = 1.0) -> int:
    """As many threads as there are cores (at most `max_threads`) that other processes leave idle, at least one."""
    meter = OtherProcessesMeter()
    time.sleep(sample_seconds)
    others = meter.cores()
    cores = os.cpu_count() or 1
    if others is None:  # no /proc/stat: trust the load average where there is one
        others = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(max_threads, round(cores - others)))


class DropToOneThreadWhenBusy(TrainerCallback):
    """Every `every` optimizer steps, fall back to one thread (for good) if other processes compete for the CPU."""

    def __init__(self, every: int = 50):
        self.every = every
        self.meter = OtherProcessesMeter()
        self.switched_at_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if torch.get_num_threads() == 1 or state.global_step % self.every:
            return
        others = self.meter.cores()
        if others is not None and others >= BUSY_CORES:
            torch.set_num_threads(1)
            self.switched_at_step = state.global_step
            print(f"\nOther processes use {others:.1f} cores: one thread from step {state.global_step} on", flush=True)
