"""Counting host-device syncs: the calls that make the host wait until the device has computed a value.

A GPU runs ahead of the host until the host needs a value the device computed: `.item()`, `bool(tensor)`,
`int(tensor)`, `.tolist()`, or a shape that depends on the data (`nonzero`, boolean-mask indexing, `masked_select`,
`unique`, `repeat_interleave` without `output_size`). On a CPU nothing waits, but the program makes the same calls,
so counting them on the CPU counts the syncs its GPU run has. Two interceptors see them all: a `TorchDispatchMode`
for the aten operators (`aten._local_scalar_dense` is what `.item()`, `bool()` and `int()` run) and a
`TorchFunctionMode` for `.tolist()` / `.numpy()`, which read CPU memory without any operator. Not counted, because
a CPU run cannot tell them apart from host work: blocking host-to-device copies of Python lists (a GPU test checks
those with `torch.cuda.set_sync_debug_mode`).
"""

from collections import Counter
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten operators that read a device value back (or size their output from one).
SYNCING_OPERATORS = {
    aten._local_scalar_dense.default,  # .item(), bool(tensor), int(tensor), float(tensor)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
INDEXING_OPERATORS = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
SIZING_OPERATORS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}  # sync without output_size
# Tensor methods that copy device memory to the host without an aten operator on a CPU.
READING_METHODS = {"tolist", "numpy", "__array__"}


def is_boolean_index(indices) -> bool:
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, calls: Counter):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPERATORS:
            self.calls[str(func)] += 1
        elif func in INDEXING_OPERATORS and is_boolean_index(args[1]):
            self.calls[f"{func} (boolean mask)"] += 1
        elif func in SIZING_OPERATORS and kwargs.get("output_size") is None:
            self.calls[f"{func} (no output_size)"] += 1
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, calls: Counter):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READING_METHODS:
            self.calls[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts the host-device syncs made while inside: `count` in all, `calls` by operator or method."""

    def __init__(self):
        self.calls: Counter = Counter()
        self._modes = (_DispatchCounter(self.calls), _FunctionCounter(self.calls))

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __enter__(self) -> "SyncCounter":
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "SyncCounter counts nothing under torch.inference_mode(): operators on inference tensors bypass "
                "Python dispatch modes. Count under torch.no_grad() (inside inference_mode, add "
                "torch.inference_mode(False))."
            )
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc_info)


def syncs_per_forward(model: torch.nn.Module, run: Callable[[], object]) -> list[int]:
    """Syncs in each call of `model`'s forward while `run()` runs (e.g. `generate`: the prefill, then each step).

    Only what the forward itself does is counted, not what `run` does between forwards.
    """
    counts, active = [], []

    def start(module, args, kwargs):
        active.append(SyncCounter().__enter__())

    def stop(module, args, kwargs, output):
        counter = active.pop()
        counter.__exit__(None, None, None)
        counts.append(counter.count)

    handles = [
        model.register_forward_pre_hook(start, with_kwargs=True),
        model.register_forward_hook(stop, with_kwargs=True),
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        while active:  # a forward that raised
            active.pop().__exit__(None, None, None)
    return counts
