"""Offline throughput in vLLM at a fixed KV cache memory: stock LLaVA vs ADSC at several budgets, same weights.

    python -m vllm_adsc.bench CHECKPOINT IMAGE [--budgets 192 128 64] [--requests 64] [--kv-cache-mb 64]
        [--output-tokens 32] [--watermark 0.2] [--repeats 1] [--dtype bfloat16] [--load-format dummy]
    python -m vllm_adsc.bench CHECKPOINT IMAGE --overhead [--batch-sizes 1 16 64 256]   (see `overhead`)

One engine per schedule (stock is the empty schedule, the others re-solve `r` with `with_budget` and reach the model
through `hf_overrides`), each given the same KV cache memory. All requests (the same image and question, a distinct
request id) are queued at once; the engine steps until they are done, and the fastest of `--repeats` such rounds
counts. Printed per schedule: requests/s, output tokens/s (also per second of this process's CPU time), the most
requests it ran at once, and the ratios to stock. `--load-format dummy` builds random weights in vLLM, so a
config-only checkpoint (config, configuration file, processor files) is enough.
"""

import argparse
import gc
import time
from dataclasses import dataclass

from PIL import Image
from transformers import AutoConfig
from vllm import LLM, SamplingParams
from vllm.distributed import cleanup_dist_env_and_memory

from vllm_adsc import overhead


@dataclass
class Throughput:
    name: str
    seconds: float
    cpu_seconds: float  # this process's CPU time (the engine runs in it): less at the mercy of a shared machine
    requests: int
    output_tokens: int
    max_running: int
    preemptions: int  # times a request went back to the queue for want of KV blocks (and recomputes its prompt)

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.output_tokens / self.cpu_seconds


def make_engine(checkpoint: str, schedule: dict, args: argparse.Namespace, **settings) -> LLM:
    """A vLLM engine for `schedule` with the bench's KV cache memory, block size, watermark, dtype and weights, and
    `settings`."""
    return LLM(
        model=checkpoint,
        trust_remote_code=True,
        hf_overrides=schedule,
        dtype=args.dtype,
        load_format=args.load_format,
        kv_cache_memory_bytes=int(args.kv_cache_mb * 2**20),
        block_size=args.block_size,
        watermark=args.watermark,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False,
        seed=0,
        **settings,
    )


def run_schedule(name: str, checkpoint: str, schedule: dict, prompt: dict, args: argparse.Namespace) -> Throughput:
    llm = make_engine(checkpoint, schedule, args, max_num_seqs=args.requests, enforce_eager=args.enforce_eager)
    try:
        engine = llm.llm_engine
        params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
        # Two warm-up rounds of different sizes: torch.compile specialises on the first shapes it sees, and
        # recompiles once for dynamic ones.
        for round_size in (1, 2):
            for index in range(round_size):
                engine.add_request(f"warm-up-{round_size}-{index}", prompt, params)
            while engine.has_unfinished_requests():
                engine.step()
        scheduler = getattr(getattr(engine.engine_core, "engine_core", None), "scheduler", None)
        rounds = []
        for round_index in range(args.repeats):
            started, cpu_started, output_tokens, max_running = time.perf_counter(), time.process_time(), 0, 0
            preemptions: dict[str, int] = {}
            for index in range(args.requests):
                engine.add_request(f"{round_index}-{index}", prompt, params)
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        output_tokens += len(output.outputs[0].token_ids)
                if scheduler is not None:
                    max_running = max(max_running, len(scheduler.running))
                    preemptions |= {key: request.num_preemptions for key, request in scheduler.requests.items()}
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            rounds.append(
                Throughput(
                    name, seconds, cpu_seconds, args.requests, output_tokens, max_running, sum(preemptions.values())
                )
            )
        return min(rounds, key=lambda result: result.seconds)
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def run_overhead(name: str, checkpoint: str, schedule: dict, prompt: dict, args) -> list[overhead.StepCost]:
    batch_sizes = sorted(args.batch_sizes)
    llm = make_engine(
        checkpoint,
        schedule,
        args,
        max_num_seqs=batch_sizes[-1] + 1,
        max_num_batched_tokens=batch_sizes[-1] + args.max_model_len,
        async_scheduling=False,
        enforce_eager=True,
    )
    try:
        return overhead.measure(name, llm, prompt, batch_sizes, args.steps, args.mixed_steps)
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def main(argv: list[str] | None = None) -> list[Throughput] | None:
    """Print the table; returns the throughput per schedule (None with --overhead)."""
    parser = argparse.ArgumentParser(prog="python -m vllm_adsc.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an ADSC-LLaVA checkpoint folder")
    parser.add_argument("image", help="the image every request asks about")
    parser.add_argument("--budgets", type=float, nargs="*", default=[192, 128, 64])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-mb", type=float, default=64, help="KV cache memory of every engine")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: vLLM's)")
    parser.add_argument(
        "--watermark",
        type=float,
        default=0.0,
        help="vLLM's admission watermark, the same for every engine: the fraction of KV blocks a new request must "
        "leave free (fewer preemptions when many requests decode at once)",
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto", help="'dummy': random weights built by vLLM")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always so on the CPU)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed rounds per schedule; the fastest counts (noisy machines)"
    )
    parser.add_argument("--question", default="What is in the image?")
    parser.add_argument("--overhead", action="store_true", help="time the host work per step instead (`overhead`)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16, 64, 256], help="with --overhead")
    parser.add_argument("--steps", type=int, default=16, help="with --overhead: decode steps timed per batch size")
    parser.add_argument("--mixed-steps", type=int, default=4, help="with --overhead: mixed steps timed per size")
    args = parser.parse_args(argv)
    config = AutoConfig.from_pretrained(args.checkpoint, trust_remote_code=True)
    prompt = {
        "prompt": f"USER: <image>\n{args.question} ASSISTANT:",
        "multi_modal_data": {"image": Image.open(args.image).convert("RGB")},
    }
    schedules = [("stock", config.with_budget(None).schedule)]
    schedules += [(f"ADSC {budget:g}", config.with_budget(budget).schedule) for budget in args.budgets]
    if args.overhead:
        overhead.print_table(
            [cost for name, sched in schedules for cost in run_overhead(name, args.checkpoint, sched, prompt, args)]
        )
        return None
    results = [run_schedule(name, args.checkpoint, schedule, prompt, args) for name, schedule in schedules]
    print(
        f"{args.requests} requests (one image, {args.output_tokens} output tokens), KV cache {args.kv_cache_mb} MB, "
        f"watermark {args.watermark:g}"
    )
    print(
        f"{'schedule':<10} {'requests/s':>10} {'tokens/s':>9} {'x stock':>8} {'tokens/CPU s':>12} {'x stock':>8} "
        f"{'max running':>11} {'x stock':>8} {'preempted':>9}"
    )
    stock = results[0]
    for result in results:
        print(
            f"{result.name:<10} {result.requests_per_second:>10.2f} {result.tokens_per_second:>9.1f} "
            f"{result.tokens_per_second / stock.tokens_per_second:>8.2f} {result.tokens_per_cpu_second:>12.1f} "
            f"{result.tokens_per_cpu_second / stock.tokens_per_cpu_second:>8.2f} {result.max_running:>11} "
            f"{result.max_running / max(stock.max_running, 1):>8.2f} {result.preemptions:>9}"
        )
    return results


if __name__ == "__main__":
    main()
