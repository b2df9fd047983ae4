"""Count, by construction, the host-device synchronisations the plugin's own code asks for.

On a GPU, reading a device tensor on the host (`.cpu()`, `.item()`, `.tolist()`, `int(t)`, `bool(t)`, ...) waits for
every kernel queued before it, and a copy from pageable host memory waits too. On the CPU none of these costs
anything, so a CPU run cannot time them; it can count them. `HostSyncCounter` is a `TorchFunctionMode` that sees
every tensor method call and counts those made *from this package's files* (vLLM's own calls are not the plugin's).
A step of the plugin should make no host reads and at most one transfer, non-blocking.
"""

import sys
from collections import Counter
from pathlib import Path

from torch.overrides import TorchFunctionMode

PACKAGE_DIR = str(Path(__file__).resolve().parent)

# Tensor methods that return host values: on a device tensor each one blocks until the device catches up.
HOST_READS = frozenset({"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy"})
# Tensor methods that move data between tensors, possibly between host and device.
TRANSFERS = frozenset({"to", "copy_"})


class HostSyncCounter(TorchFunctionMode):
    """Within `with HostSyncCounter() as counter:`, `counter.host_reads` counts the host reads the plugin's code made
    (by method name), `counter.blocking_transfers` its `.to()` / `copy_` calls without `non_blocking=True`, and
    `counter.async_transfers` those with it."""

    def __init__(self, package_dir: str = PACKAGE_DIR) -> None:
        super().__init__()
        self.package_dir = package_dir
        self.host_reads: Counter[str] = Counter()
        self.blocking_transfers: Counter[str] = Counter()
        self.async_transfers: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS or name in TRANSFERS:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(self.package_dir) and caller.co_filename != __file__:
                where = f"{Path(caller.co_filename).name}:{caller.co_name}.{name}"
                if name in HOST_READS:
                    self.host_reads[where] += 1
                elif kwargs.get("non_blocking", False):
                    self.async_transfers[where] += 1
                else:
                    self.blocking_transfers[where] += 1
        return func(*args, **kwargs)

    @property
    def syncs(self) -> int:
        """Host reads plus blocking transfers: what would stall a GPU's queue."""
        return sum(self.host_reads.values()) + sum(self.blocking_transfers.values())
