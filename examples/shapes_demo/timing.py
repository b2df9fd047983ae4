"""Where the demo's time goes: wall and CPU seconds per phase, and how busy the machine was meanwhile.

On a shared machine wall time says little about the demo alone: CPU seconds (this process and the child processes
it waited for: data loader workers, the fresh-process pipeline check) are what an idle machine would also spend,
and the load average says how many runnable processes shared the cores.
"""

import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have finished."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class PhaseClock:
    """Wall and CPU seconds per named phase (summed over its repeats), and the 1-minute load average sampled every
    `every` seconds (None: not sampled) in a background thread from creation until `stop()`."""

    def __init__(self, every: float | None = 15.0):
        self.phases: dict[str, dict[str, float]] = {}
        self.started_wall, self.started_cpu = time.monotonic(), cpu_seconds()
        self.loads: list[float] = []
        self._stopped = threading.Event()
        self._sampler = None
        if every is not None:
            self._sampler = threading.Thread(target=self._sample_load, args=(every,), daemon=True)
            self._sampler.start()

    def _sample_load(self, every: float) -> None:
        while True:
            if hasattr(os, "getloadavg"):
                self.loads.append(os.getloadavg()[0])
            if self._stopped.wait(every):
                return

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.monotonic(), cpu_seconds()
        try:
            yield
        finally:
            self.add({name: {"runs": 1, "wall_s": time.monotonic() - wall, "cpu_s": cpu_seconds() - cpu}})

    def add(self, phases: dict[str, dict[str, float]]) -> None:
        """Add phases timed elsewhere (another clock's `phases`, e.g. a worker process's) to these."""
        for name, timed in phases.items():
            entry = self.phases.setdefault(name, {"runs": 0, "wall_s": 0.0, "cpu_s": 0.0})
            for key in entry:
                entry[key] += timed[key]

    def stop(self) -> dict:
        """Stop sampling; the phases, the totals and the load (mean and max of the samples) as a JSON-able dict."""
        self._stopped.set()
        if self._sampler is not None:
            self._sampler.join()
        return {
            "phases": self.phases,
            "total_wall_s": time.monotonic() - self.started_wall,
            "total_cpu_s": cpu_seconds() - self.started_cpu,
            "load_mean": sum(self.loads) / len(self.loads) if self.loads else None,
            "load_max": max(self.loads, default=None),
            "cores": os.cpu_count(),
        }


def timing_table(timing: dict) -> str:
    """`PhaseClock.stop()`'s record as a Markdown table, the machine's load under it."""
    lines = ["| phase | runs | wall s | CPU s | CPU / wall |", "|---|---|---|---|---|"]
    rows = [
        *timing["phases"].items(),
        ("total", {"runs": "", "wall_s": timing["total_wall_s"], "cpu_s": timing["total_cpu_s"]}),
    ]
    for name, entry in rows:
        ratio = entry["cpu_s"] / entry["wall_s"] if entry["wall_s"] > 0 else 0.0
        lines.append(f"| {name} | {entry['runs']} | {entry['wall_s']:.0f} | {entry['cpu_s']:.0f} | {ratio:.2f} |")
    if timing["load_mean"] is not None:
        lines += [
            "",
            f"Load average (1 min) while it ran: mean {timing['load_mean']:.1f}, max {timing['load_max']:.1f}, "
            f"on {timing['cores']} cores.",
        ]
    return "\n".join(lines) + "\n"
