"""The lmms-eval plugin: `lmms-eval --model adsc_llava` evaluates a tiny ADSC checkpoint on a tiny offline task.

lmms-eval cannot share the project's environment (it requires torchvision, whose PyPI wheel is a CUDA build), so the
test builds its own with `eval/lmms_eval_env.sh` into `.venv-lmms-eval` (about 80 s, once per clone). lmms-eval exits
0 even when an evaluation fails, so it runs with `--verbosity DEBUG` (which re-raises) and the test reads the results
and samples files. Its answers must equal an independent batched `generate()` on the same checkpoint in the same
environment, with the checkpoint's schedule, with a budget given on the command line, and with a baseline policy.
"""

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from transformers import LlavaConfig

from adsc_llava import AdscLlavaConfig
from adsc_llava.configuration_adsc_llava import policy_pruning_layers

from conftest import save_word_answering_checkpoint

REPO = Path(__file__).resolve().parents[1]
EVAL_VENV = REPO / ".venv-lmms-eval"
EVAL_PYTHON = EVAL_VENV / "bin" / "python"
BUILD_TIMEOUT_S = 900
RUN_TIMEOUT_S = 300
NEW_TOKENS = 4
BATCH_SIZE = 2
# Prompts of different lengths, so a batch is padded; images of different colors, so answers can differ.
DOCS = [
    {"question": "what is in the image ?", "color": "red"},
    {"question": "how many shape ?", "color": "blue"},
    {"question": "what color is the background of this picture ?", "color": "green"},
]

TASK_YAML = """\
task: tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {new_tokens}
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: exact_answer
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def process_results(doc, results):
    return {"exact_answer": float(results[0].strip() == doc["answer"])}
"""

# Runs in the lmms-eval environment without the plugin: what a user's own batched generate() answers.
REFERENCE_SCRIPT = """\
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

checkpoint, docs_file, schedule, batch_size, new_tokens = sys.argv[1:]
docs = [json.loads(line) for line in open(docs_file)]
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.bfloat16).eval()
model.config.update(json.loads(schedule))
processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
processor.tokenizer.padding_side = "left"
answers = []
for start in range(0, len(docs), int(batch_size)):
    batch = docs[start : start + int(batch_size)]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for doc in batch
    ]
    images = [Image.open(doc["image_path"]).convert("RGB") for doc in batch]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=int(new_tokens), do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    answers += processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
print(json.dumps({"answers": answers, "schedule": model.config.schedule}))
"""

# Runs in the lmms-eval environment: the plugin's model class as lmms-eval builds it.
PLUGIN_SCRIPT = """\
import json, sys
from lmms_eval.models import get_model

checkpoint, model_args = sys.argv[1:]
model_class = get_model("adsc_llava", force_simple=False)
lmm = model_class(pretrained=checkpoint, device="cpu", batch_size=1, max_batch_size=None, **json.loads(model_args))
print(json.dumps({"schedule": lmm.model.config.schedule, "padding_side": lmm.processor.tokenizer.padding_side}))
"""


def eval_environment_ready() -> bool:
    if not EVAL_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(EVAL_PYTHON), "-c", "import lmms_eval.models, adsc_llava.lmms_eval_plugin"],
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def eval_python() -> Path:
    if not eval_environment_ready():
        build = subprocess.run(
            ["bash", str(REPO / "eval" / "lmms_eval_env.sh"), str(EVAL_VENV)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        assert build.returncode == 0, f"eval/lmms_eval_env.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    return EVAL_PYTHON


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_word_answering_checkpoint(tmp_path_factory.mktemp("lmms-eval") / "tiny-adsc", NEW_TOKENS)


def run_in(python: Path, script: str, *args: str, env: dict | None = None) -> dict:
    result = subprocess.run(
        [str(python), "-c", script, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_task(folder: Path, answers: list[str]) -> Path:
    """A three-question task whose first target is `answers[0]` and the others are not their answers."""
    folder.mkdir()
    docs = []
    for index, doc in enumerate(DOCS):
        image_path = folder / f"image{index}.png"
        Image.new("RGB", (40, 30 + 10 * index), doc["color"]).save(image_path)
        answer = answers[index] if index == 0 else "no answer"
        docs.append({"question": doc["question"], "image_path": str(image_path), "answer": answer})
    data_file = folder / "test.jsonl"
    data_file.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task_folder = folder / "tasks" / "tiny_vqa"
    task_folder.mkdir(parents=True)
    (task_folder / "tiny_vqa.yaml").write_text(TASK_YAML.format(data_file=data_file, new_tokens=NEW_TOKENS))
    (task_folder / "utils.py").write_text(TASK_UTILS)
    return data_file


def offline_env(home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# model_args beyond `pretrained`, and the schedule they must give (from the checkpoint's config, in this process).
MODEL_ARGS = {
    "checkpoint": ({}, lambda config: config),
    "budget": ({"budget": 6}, lambda config: config.with_budget(6)),
    "pyramiddrop": (
        {"budget": 8, "method": "pyramiddrop", "layers": "1/3"},
        lambda config: AdscLlavaConfig.from_dict(config.to_dict() | {"adsc_keep_policy": "pyramiddrop"}).with_budget(
            8, [1, 3]
        ),
    ),
    "fastv": (
        {"budget": 8, "method": "fastv", "layers": 2},
        lambda config: AdscLlavaConfig.from_dict(config.to_dict() | {"adsc_keep_policy": "fastv"}).with_budget(8, [2]),
    ),
    "fastv-own-layers": (  # FastV's own layer (K = 2 of 32: layer 1 of 4), not the checkpoint's [1, 2]
        {"budget": 8, "method": "fastv"},
        lambda config: AdscLlavaConfig.from_dict(config.to_dict() | {"adsc_keep_policy": "fastv"}).with_budget(
            8, policy_pruning_layers("fastv", config.text_config.num_hidden_layers)
        ),
    ),
}


def expected_schedule(checkpoint: Path, case: str) -> dict:
    return MODEL_ARGS[case][1](AdscLlavaConfig.from_pretrained(checkpoint)).schedule


@pytest.mark.parametrize("case", ["checkpoint", "budget", "fastv"])
def test_lmms_eval_answers_equal_a_direct_batched_generate(eval_python, checkpoint, tmp_path, case):
    # The data file is written twice: first to get the reference answers, then with the first one as a target.
    probe_docs = tmp_path / "probe"
    data_file = write_task(probe_docs, ["?"] * len(DOCS))
    env = offline_env(tmp_path / "hf")
    schedule = json.dumps(expected_schedule(checkpoint, case))
    reference = run_in(eval_python, REFERENCE_SCRIPT, str(checkpoint), str(data_file), schedule, str(BATCH_SIZE),
                       str(NEW_TOKENS), env=env)  # fmt: skip
    assert all(answer.strip() for answer in reference["answers"])
    task_root = tmp_path / "task"
    write_task(task_root, reference["answers"])

    model_args = ",".join(
        [f"pretrained={checkpoint}", *(f"{key}={value}" for key, value in MODEL_ARGS[case][0].items())]
    )
    output_path = tmp_path / "results"
    command = [
        str(eval_python.parent / "lmms-eval"), "--model", "adsc_llava", "--model_args", model_args,
        "--tasks", "tiny_vqa", "--include_path", str(task_root / "tasks"), "--output_path", str(output_path),
        "--batch_size", str(BATCH_SIZE), "--device", "cpu", "--log_samples", "--verbosity", "DEBUG",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert run.returncode == 0, run.stderr[-4000:]

    results_files = list(output_path.glob("**/*_results.json"))
    samples_files = list(output_path.glob("**/*_samples_tiny_vqa.jsonl"))
    assert len(results_files) == 1 and len(samples_files) == 1, (results_files, samples_files, run.stderr[-2000:])
    samples = sorted(
        (json.loads(line) for line in samples_files[0].read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    responses = [sample["filtered_resps"] for sample in samples]
    assert responses == reference["answers"]
    metrics = json.loads(results_files[0].read_text())["results"]["tiny_vqa"]
    expected = sum(
        response.strip() == sample["target"] for response, sample in zip(responses, samples, strict=True)
    ) / len(DOCS)
    assert expected >= 1 / len(DOCS)
    assert metrics["exact_answer,none"] == pytest.approx(expected)


@pytest.mark.parametrize("case", list(MODEL_ARGS))
def test_plugin_loads_the_schedule_and_pads_left(eval_python, checkpoint, case):
    loaded = run_in(eval_python, PLUGIN_SCRIPT, str(checkpoint), json.dumps(MODEL_ARGS[case][0]))
    assert loaded["schedule"] == expected_schedule(checkpoint, case)
    assert loaded["padding_side"] == "left"


def test_plugin_refuses_layers_without_a_budget_and_unknown_methods(eval_python, checkpoint):
    for model_args, message in [({"layers": "1/3"}, "needs a budget"), ({"method": "random"}, "must be one of")]:
        result = subprocess.run(
            [str(eval_python), "-c", PLUGIN_SCRIPT, str(checkpoint), json.dumps(model_args)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_a_budget_for_another_policy_goes_to_that_policys_own_layers(monkeypatch):
    """`method=fastv,budget=B` without `layers`: FastV's K = 2 of 32, not the checkpoint's four ADSC layers.

    Runs in the project's environment: the two lmms-eval classes the plugin subclasses are stubbed.
    """
    for name, attribute in [("lmms_eval.models.chat.huggingface", "Huggingface"),
                            ("lmms_eval.models.registry_v2", "ModelManifest")]:  # fmt: skip
        module = types.ModuleType(name)
        setattr(module, attribute, type(attribute, (), {"__init__": lambda self, **kwargs: None}))
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "adsc_llava.lmms_eval_plugin", raising=False)
    plugin = importlib.import_module("adsc_llava.lmms_eval_plugin")

    checkpoint = AdscLlavaConfig.from_llava_config(LlavaConfig(), budget=192)  # uniform on [2, 8, 16, 24]
    fastv = plugin.resolve_schedule(checkpoint, budget=192, method="fastv", layers=None)
    assert (fastv["adsc_keep_policy"], fastv["adsc_pruning_layers"]) == ("fastv", [2])
    assert plugin.resolve_schedule(checkpoint, 192, "fastv", "4")["adsc_pruning_layers"] == [4]  # layers= wins
    assert plugin.resolve_schedule(checkpoint, 128, "uniform", None)["adsc_pruning_layers"] == [2, 8, 16, 24]


def test_the_project_itself_does_not_import_lmms_eval():
    probe = subprocess.run(
        [sys.executable, "-c", "import adsc_llava, adsc_llava.cli, sys; assert 'lmms_eval' not in sys.modules"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr


def test_adsc_llava_eval_sweeps_methods_and_budgets_into_a_table_and_a_plot(eval_python, checkpoint, tmp_path):
    task_root = tmp_path / "task"
    reference = run_in(eval_python, REFERENCE_SCRIPT, str(checkpoint), str(write_task(tmp_path / "probe", ["?"] * 3)),
                       json.dumps(expected_schedule(checkpoint, "checkpoint")), str(BATCH_SIZE), str(NEW_TOKENS),
                       env=offline_env(tmp_path / "hf"))  # fmt: skip
    write_task(task_root, reference["answers"])
    command = [
        sys.executable, "-m", "adsc_llava", "eval", str(checkpoint), "--tasks", "tiny_vqa", "--budgets", "8", "2",
        "--methods", "uniform", "fastv", "pyramiddrop", "--device", "cpu", "--batch-size", str(BATCH_SIZE),
        "--include-path", str(task_root / "tasks"), "--output-dir", str(tmp_path / "runs"),
        "--plot", str(tmp_path / "scores.png"), "--lmms-eval", str(eval_python.parent / "lmms-eval"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=4 * RUN_TIMEOUT_S,
                            env=offline_env(tmp_path / "hf"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [
        line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    table = {(cells[0].strip(), cells[1].strip()): cells for cells in rows[1:]}
    assert list(table) == [("checkpoint", "checkpoint"), ("ADSC", "8"), ("FastV", "8"), ("PyramidDrop", "8")]
    assert table[("checkpoint", "checkpoint")][3].strip() == "0.3333"  # the first answer is the only target met
    assert table[("FastV", "8")][2].strip() == "[1]" and table[("PyramidDrop", "8")][2].strip() == "[1, 2, 3]"
    assert all(0 <= float(cells[3]) <= 1 for cells in table.values())
    # Budget 2 is below what pruning first at layer 1 of 4 reaches (16 tokens / 4 layers): listed, not run.
    assert "left out: FastV 2: its layers [1] reach [4, 16)" in result.stdout
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def save_qwen_word_answering_checkpoint(folder: Path, family: str) -> Path:
    """A tiny pruned ADSC Qwen-VL checkpoint (with its torchvision-free processor) answering plain words."""
    import torch

    from adsc_llava.families import family_of
    from adsc_llava.testing import (
        QWEN_PROMPT_WORDS,
        QWEN_SPECIAL_TOKENS,
        build_qwen_processor,
        build_qwen_tokenizer,
        tiny_qwen_vl_config,
    )

    tokenizer = build_qwen_tokenizer()
    adsc_family = family_of(family)
    config = adsc_family.config_class.from_stock_config(
        tiny_qwen_vl_config(family, tokenizer), pruning_layers=[1, 2], drop_ratio=0.5
    )
    torch.manual_seed(0)
    model = adsc_family.model_class(config).eval()
    generation = model.generation_config
    generation.do_sample, generation.max_new_tokens, generation.min_new_tokens = False, NEW_TOKENS, NEW_TOKENS
    generation.suppress_tokens = tokenizer.convert_tokens_to_ids([*QWEN_SPECIAL_TOKENS, *QWEN_PROMPT_WORDS])
    model.save_pretrained(folder)
    build_qwen_processor(tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_lmms_eval_runs_qwen_checkpoints_at_a_budget(eval_python, tmp_path, family):
    """The plugin loads an ADSC Qwen-VL checkpoint, re-solves its schedule for a budget of its 1280 x 720 reference
    photo, pads on the left, and lmms-eval's answers are a direct batched `generate()`'s."""
    from adsc_llava.families import family_of

    checkpoint = save_qwen_word_answering_checkpoint(tmp_path / "tiny-adsc-qwen", family)
    config = family_of(family).config_class.from_pretrained(checkpoint)
    budget = round(config.reference_vision_tokens / 3, 1)
    loaded = run_in(eval_python, PLUGIN_SCRIPT, str(checkpoint), json.dumps({"budget": budget}))
    assert loaded["schedule"] == config.with_budget(budget).schedule and loaded["padding_side"] == "left"

    env = offline_env(tmp_path / "hf")
    data_file = write_task(tmp_path / "probe", ["?"] * len(DOCS))
    reference = run_in(eval_python, REFERENCE_SCRIPT, str(checkpoint), str(data_file), json.dumps(loaded["schedule"]),
                       str(BATCH_SIZE), str(NEW_TOKENS), env=env)  # fmt: skip
    task_root = tmp_path / "task"
    write_task(task_root, reference["answers"])
    output_path = tmp_path / "results"
    command = [
        str(eval_python.parent / "lmms-eval"), "--model", "adsc_llava", "--model_args",
        f"pretrained={checkpoint},budget={budget}", "--tasks", "tiny_vqa", "--include_path", str(task_root / "tasks"),
        "--output_path", str(output_path), "--batch_size", str(BATCH_SIZE), "--device", "cpu", "--log_samples",
        "--verbosity", "DEBUG",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    (samples_file,) = output_path.glob("**/*_samples_tiny_vqa.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [sample["filtered_resps"] for sample in samples] == reference["answers"]
