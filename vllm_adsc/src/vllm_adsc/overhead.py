"""Host time per engine step outside the model's compute, stock vs ADSC, at several numbers of running requests.

    python -m vllm_adsc.bench CHECKPOINT IMAGE --overhead [--batch-sizes 1 16 64 256] [--budgets 192]

For each schedule one engine runs in this process. For each batch size B it starts B requests (one image each) and
steps until all of them decode, then times:
- decode-only steps: the B requests decode one token each;
- mixed steps: the B requests decode while one new request prefills its whole prompt (image included).
Per step it times the engine's host work that the plugin changes or adds: the scheduler (`schedule`,
`update_from_output`, which run the KV cache managers), the model runner's input preparation (`_prepare_inputs`,
`_get_slot_mappings`, `_build_attention_metadata`: positions, slot mappings, attention metadata), and the plugin's
own hooks among them, in CPU time of the engine's thread (`time.thread_time`: the host work itself, without the
time a shared machine's other processes keep the thread from a core). The model's compute is not timed (the plugin
does no host work in the forward). It also counts the host-device synchronisations the plugin's code asks for in one
step of each kind (`syncs.HostSyncCounter`).
"""

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

from vllm import SamplingParams

from vllm_adsc.syncs import HostSyncCounter

# The host work timed per step: vLLM's scheduler (which runs the KV cache managers, the plugin's stage counts among
# them) and its model runner's input preparation (which runs the plugin's hooks); of the latter, the plugin's own
# hooks (the stage plan, the stage inputs' buffer and copy, each stage's metadata fields) also on their own.
SCHEDULER_METHODS = ("schedule", "update_from_output")
RUNNER_METHODS = ("_prepare_inputs", "_get_slot_mappings", "_build_attention_metadata")
PLUGIN_RUNNER_METHODS = ("_plan_step", "_send_step")
PLUGIN_STAGE_INPUTS_METHODS = ("stage_metadata",)


class PhaseTimer:
    """Wraps methods of live objects (instance attributes shadowing the class's) and sums their time per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, owner: object, names: tuple[str, ...]) -> None:
        for name in names:
            method = getattr(owner, name, None)
            if method is not None:
                setattr(owner, name, self._timed(phase, method))

    def _timed(self, phase: str, method):
        def timed(*args, **kwargs):
            started = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[phase] += time.thread_time() - started

        return timed

    def take(self) -> dict[str, float]:
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


@dataclass
class StepCost:
    """Median host milliseconds per step of one kind, by phase, and the plugin's syncs in one such step."""

    schedule: str
    batch_size: int
    kind: str  # "decode" or "mixed"
    milliseconds: dict[str, float] = field(default_factory=dict)
    host_reads: int = 0
    blocking_transfers: int = 0
    async_transfers: int = 0

    @property
    def total(self) -> float:
        """Scheduler and runner (the plugin's hooks run inside the runner's methods)."""
        return self.milliseconds.get("scheduler", 0.0) + self.milliseconds.get("runner", 0.0)


def engine_parts(llm):
    """The in-process engine core's scheduler, model runner and model (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    return core.scheduler, runner, runner.get_model()


def measure(name: str, llm, prompt: dict, batch_sizes: list[int], steps: int, mixed_steps: int) -> list[StepCost]:
    engine = llm.llm_engine
    scheduler, runner, model = engine_parts(llm)
    timer = PhaseTimer()
    timer.wrap("scheduler", scheduler, SCHEDULER_METHODS)
    timer.wrap("runner", runner, RUNNER_METHODS)
    timer.wrap("plugin hooks", runner, PLUGIN_RUNNER_METHODS)
    if hasattr(model, "stage_inputs"):
        timer.wrap("plugin hooks", model.stage_inputs, PLUGIN_STAGE_INPUTS_METHODS)
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True, detokenize=False)
    costs, request_index = [], 0

    def add_request() -> str:
        nonlocal request_index
        request_index += 1
        engine.add_request(f"{name}-{request_index}", prompt, params)
        return f"{name}-{request_index}"

    def timed_step() -> dict[str, float]:
        timer.take()
        engine.step()
        return timer.take()

    def counted_step() -> HostSyncCounter:
        with HostSyncCounter() as counter:
            engine.step()
        return counter

    for batch_size in batch_sizes:
        running = [add_request() for _ in range(batch_size)]
        while len(scheduler.running) < batch_size or any(
            request.num_computed_tokens < request.num_prompt_tokens for request in scheduler.running
        ):
            engine.step()
        decode = [timed_step() for _ in range(steps)]
        decode_syncs = counted_step()
        mixed, mixed_syncs = [], None
        for index in range(mixed_steps + 1):
            request_id = add_request()
            if index < mixed_steps:
                mixed.append(timed_step())
            else:
                mixed_syncs = counted_step()
            engine.abort_request([request_id])
        for kind, samples, counter in (("decode", decode, decode_syncs), ("mixed", mixed, mixed_syncs)):
            phases = sorted({phase for sample in samples for phase in sample})
            costs.append(
                StepCost(
                    name,
                    batch_size,
                    kind,
                    {p: 1e3 * statistics.median(s.get(p, 0.0) for s in samples) for p in phases},
                    sum(counter.host_reads.values()),
                    sum(counter.blocking_transfers.values()),
                    sum(counter.async_transfers.values()),
                )
            )
        engine.abort_request(running)
        while engine.has_unfinished_requests():
            engine.step()
    return costs


def print_table(costs: list[StepCost]) -> None:
    stock = {(c.batch_size, c.kind): c for c in costs if c.schedule == "stock"}
    print("Host CPU ms per engine step (median), outside the model's compute; the plugin's syncs in one step")
    header = f"{'schedule':<10} {'B':>4} {'step':<7} {'scheduler':>9} {'runner':>7} {'plugin hooks':>12} {'total':>7}"
    print(f"{header} {'- stock':>8} {'host reads':>10} {'blocking':>8} {'async':>6}")
    for cost in costs:
        base = stock.get((cost.batch_size, cost.kind))
        extra = cost.total - base.total if base is not None else float("nan")
        ms = cost.milliseconds
        print(
            f"{cost.schedule:<10} {cost.batch_size:>4} {cost.kind:<7} {ms.get('scheduler', 0):>9.3f} "
            f"{ms.get('runner', 0):>7.3f} {ms.get('plugin hooks', 0):>12.3f} {cost.total:>7.3f} {extra:>8.3f} "
            f"{cost.host_reads:>10} {cost.blocking_transfers:>8} {cost.async_transfers:>6}"
        )
