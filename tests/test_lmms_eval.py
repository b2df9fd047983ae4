"""The lmms-eval plugin: `lmms-eval --model adsc_llava` evaluates a tiny ADSC checkpoint on tiny offline tasks.

lmms-eval cannot share the project's environment (it requires torchvision, which does not load beside the CPU torch
the project pins here), so the tests build its own with `eval/lmms_eval_env.sh` into `.venv-lmms-eval` (minutes, once
per clone); a build that cannot work fails the tests with the script's reason, within `BUILD_TIMEOUT_S`. lmms-eval
exits 0 even when an evaluation fails, so it runs with `--verbosity DEBUG` (which re-raises) and the tests read the
results and samples files. Its answers must equal an independent batched `generate()` on the same checkpoint in the
same environment, batched as the plugin batches (same generation kwargs, longest prompt first): with the
checkpoint's schedule, a budget given on the command line and a baseline policy; and for the task shapes LLaVA's
benchmarks have: text-only documents (ScienceQA), several images per document, text-only and image rows in one batch,
and `until` stop strings without `max_new_tokens` (TextVQA, VizWiz, SEED).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from transformers import LlavaConfig

from adsc_llava import AdscLlavaConfig
from adsc_llava.configuration_adsc_llava import policy_pruning_layers
from adsc_llava.evaluate import resolve_schedule

from conftest import save_word_answering_checkpoint

REPO = Path(__file__).resolve().parents[1]
EVAL_VENV = REPO / ".venv-lmms-eval"
EVAL_PYTHON = EVAL_VENV / "bin" / "python"
BUILD_TIMEOUT_S = 1200
RUN_TIMEOUT_S = 300
NEW_TOKENS = 4
UNTIL_PROBE_TOKENS = 8  # the `until` task's answers are cut within this many tokens
BATCH_SIZE = 2
QUESTIONS = ["what is in the image ?", "how many shape ?", "what color is the background of this picture ?"]
COLORS = ["red", "blue", "green", "white", "black", "yellow"]
# Task shape -> images per document (prompts of different lengths, so a batch is padded).
SHAPES = {
    "vqa": [1, 1, 1],
    "text": [0, 0, 0],  # ScienceQA's text-only questions
    "multi": [2, 2, 2],
    "mixed": [1, 0, 2],  # a batch of an image row and a text-only row
    "until": [1, 1, 1],  # `until` only, no max_new_tokens
}

TASK_YAML = """\
task: {name}
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
{generation_kwargs}
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
    return [Image.open(path).convert("RGB") for path in doc["image_paths"]]


def process_results(doc, results):
    return {"exact_answer": float(results[0].strip() == doc["answer"])}
"""

GROUP_YAML = """\
group: tiny_group
task:
  - tiny_vqa
  - tiny_text
"""

# Runs in the lmms-eval environment without the plugin: what a user's own batched generate() answers, with the
# plugin's batching (prompts longest first), and the answers cut at the first stop string as lmms-eval cuts them.
REFERENCE_SCRIPT = """\
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

checkpoint, docs_file, schedule, batch_size, new_tokens, until = sys.argv[1:]
docs = [json.loads(line) for line in open(docs_file)]
until = json.loads(until)
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.bfloat16).eval()
model.config.update(json.loads(schedule))
processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
processor.tokenizer.padding_side = "left"
order = sorted(range(len(docs)), key=lambda index: (-len(docs[index]["question"]), index))
answers = {}
for start in range(0, len(order), int(batch_size)):
    batch = order[start : start + int(batch_size)]
    messages = [
        [{"role": "user", "content": [{"type": "image"}] * len(docs[index]["image_paths"])
          + [{"type": "text", "text": docs[index]["question"]}]}]
        for index in batch
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    images = [Image.open(path).convert("RGB") for index in batch for path in docs[index]["image_paths"]]
    inputs = processor(text=texts, padding=True, return_tensors="pt", **({"images": images} if images else {}))
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens),
                                do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for index, text in zip(batch, texts):
        cuts = [text.find(stop) for stop in until if text.find(stop) >= 0]
        answers[index] = text[: min(cuts)] if cuts else text
print(json.dumps({"answers": [answers[index] for index in range(len(docs))], "schedule": model.config.schedule}))
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


class EnvironmentBuildError(RuntimeError):
    """`eval/lmms_eval_env.sh` failed or did not finish; the message says which step and why."""


def build_eval_environment(venv: Path, timeout_s: float, env: dict | None = None) -> str:
    """Run `eval/lmms_eval_env.sh venv`; its output. Never hangs: after `timeout_s` the whole build is killed."""
    process = subprocess.Popen(
        ["bash", str(REPO / "eval" / "lmms_eval_env.sh"), str(venv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # pip and its children too, for the kill below
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise EnvironmentBuildError(
            f"eval/lmms_eval_env.sh did not finish within {timeout_s:g} s (a slow or unreachable package index?). "
            f"Its output:\n{output[-3000:]}"
        ) from None
    if process.returncode != 0:
        failed = [line for line in output.splitlines() if "FAILED" in line]
        raise EnvironmentBuildError(
            f"eval/lmms_eval_env.sh failed (exit {process.returncode}): {'; '.join(failed) or 'see its output'}. "
            f"Its output:\n{output[-3000:]}"
        )
    return output


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
        try:
            build_eval_environment(EVAL_VENV, BUILD_TIMEOUT_S)
        except EnvironmentBuildError as error:
            pytest.fail(str(error), pytrace=False)
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


def write_docs(folder: Path, shape: str) -> Path:
    """The documents of a task shape (answers "?" for now), each with its images drawn in its own colors."""
    docs = []
    for index, (question, num_images) in enumerate(zip(QUESTIONS, SHAPES[shape], strict=True)):
        paths = []
        for image in range(num_images):
            path = folder / f"{shape}-{index}-{image}.png"
            Image.new("RGB", (40 + 8 * image, 30 + 10 * index), COLORS[(index + 2 * image) % len(COLORS)]).save(path)
            paths.append(str(path))
        docs.append({"question": question, "image_paths": paths, "answer": "?"})
    data_file = folder / f"{shape}.jsonl"
    data_file.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return data_file


def write_task(task_root: Path, shape: str, data_file: Path, answers: list[str], until: list[str] | None = None):
    """Task `tiny_<shape>` over `data_file`, whose first target is `answers[0]` and the others are not answers."""
    docs = [json.loads(line) for line in data_file.read_text().splitlines()]
    for index, doc in enumerate(docs):
        doc["answer"] = answers[index] if index == 0 else "no answer"
    data_file.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    if until is None:
        generation_kwargs = f"  max_new_tokens: {NEW_TOKENS}\n  temperature: 0"
    else:  # lmms-eval's TextVQA, VizWiz, SEED: stop strings only
        generation_kwargs = "  until:\n" + "".join(f"    - {json.dumps(stop)}\n" for stop in until).rstrip("\n")
    folder = task_root / f"tiny_{shape}"
    folder.mkdir(parents=True)
    (folder / f"tiny_{shape}.yaml").write_text(
        TASK_YAML.format(name=f"tiny_{shape}", data_file=data_file, generation_kwargs=generation_kwargs)
    )
    (folder / "utils.py").write_text(TASK_UTILS)


def offline_env(home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def reference_answers(python, checkpoint, data_file, schedule: dict, env, new_tokens=NEW_TOKENS, until=()) -> list:
    reference = run_in(python, REFERENCE_SCRIPT, str(checkpoint), str(data_file), json.dumps(schedule),
                       str(BATCH_SIZE), str(new_tokens), json.dumps(list(until)), env=env)  # fmt: skip
    return reference["answers"]


def prepare_tasks(python, checkpoint, root: Path, shapes: list[str], schedule: dict, env) -> dict[str, list[str]]:
    """Tasks of the given shapes under `root / "tasks"`; the reference answers per shape."""
    (root / "docs").mkdir()
    expected = {}
    for shape in shapes:
        data_file = write_docs(root / "docs", shape)
        until = None
        if shape == "until":  # stop at each document's second word at the latest
            probe = reference_answers(python, checkpoint, data_file, schedule, env, new_tokens=UNTIL_PROBE_TOKENS)
            until = sorted({answer.split()[1] for answer in probe})
        expected[shape] = reference_answers(
            python, checkpoint, data_file, schedule, env, UNTIL_PROBE_TOKENS if until else NEW_TOKENS, until or ()
        )
        assert shape == "until" or all(answer.strip() for answer in expected[shape])
        write_task(root / "tasks", shape, data_file, expected[shape], until)
    return expected


def run_lmms_eval(python: Path, model_args: str, tasks: list[str], root: Path, env: dict) -> Path:
    output_path = root / "results"
    command = [
        str(python.parent / "lmms-eval"), "--model", "adsc_llava", "--model_args", model_args,
        "--tasks", ",".join(tasks), "--include_path", str(root / "tasks"), "--output_path", str(output_path),
        "--batch_size", str(BATCH_SIZE), "--device", "cpu", "--log_samples", "--verbosity", "DEBUG",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return output_path


def responses_and_metric(output_path: Path, task: str) -> tuple[list[str], list[str], float]:
    (samples_file,) = output_path.glob(f"**/*_samples_{task}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    (results_file,) = output_path.glob("**/*_results.json")
    metric = json.loads(results_file.read_text())["results"][task]["exact_answer,none"]
    return [sample["filtered_resps"] for sample in samples], [sample["target"] for sample in samples], metric


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


def assert_answers_and_metric(output_path: Path, shape: str, expected: list[str]) -> None:
    responses, targets, metric = responses_and_metric(output_path, f"tiny_{shape}")
    assert [response.strip() for response in responses] == [answer.strip() for answer in expected], shape
    matches = sum(response.strip() == target for response, target in zip(responses, targets, strict=True))
    assert matches >= (1 if expected[0].strip() else 0) and metric == pytest.approx(matches / len(responses))


@pytest.mark.parametrize("case", ["checkpoint", "fastv"])  # fastv: another budget, policy and layers
def test_lmms_eval_answers_equal_a_direct_batched_generate(eval_python, checkpoint, tmp_path, case):
    env = offline_env(tmp_path / "hf")
    schedule = expected_schedule(checkpoint, case)
    expected = prepare_tasks(eval_python, checkpoint, tmp_path, ["vqa"], schedule, env)["vqa"]
    model_args = ",".join(
        [f"pretrained={checkpoint}", *(f"{key}={value}" for key, value in MODEL_ARGS[case][0].items())]
    )
    assert_answers_and_metric(run_lmms_eval(eval_python, model_args, ["tiny_vqa"], tmp_path, env), "vqa", expected)


def test_text_only_multi_image_mixed_and_until_tasks(eval_python, checkpoint, tmp_path):
    """One lmms-eval run over the four task shapes that the generic chat class got wrong or never saw."""
    env = offline_env(tmp_path / "hf")
    shapes = ["text", "multi", "mixed", "until"]
    expected = prepare_tasks(
        eval_python, checkpoint, tmp_path, shapes, expected_schedule(checkpoint, "checkpoint"), env
    )
    assert all(len(answer.split()) < 2 for answer in expected["until"])  # cut at the stop strings
    output_path = run_lmms_eval(eval_python, f"pretrained={checkpoint}", [f"tiny_{shape}" for shape in shapes],
                                tmp_path, env)  # fmt: skip
    for shape in shapes:
        assert_answers_and_metric(output_path, shape, expected[shape])


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


def test_a_budget_for_another_policy_goes_to_that_policys_own_layers():
    """`method=fastv,budget=B` without `layers`: FastV's K = 2 of 32, not the checkpoint's four ADSC layers."""
    checkpoint = AdscLlavaConfig.from_llava_config(LlavaConfig(), budget=192)  # uniform on [2, 8, 16, 24]
    fastv = resolve_schedule(checkpoint, budget=192, method="fastv", layers=None)
    assert (fastv["adsc_keep_policy"], fastv["adsc_pruning_layers"]) == ("fastv", [2])
    assert resolve_schedule(checkpoint, 192, "fastv", "4")["adsc_pruning_layers"] == [4]  # layers= wins
    assert resolve_schedule(checkpoint, 128, "uniform", None)["adsc_pruning_layers"] == [2, 8, 16, 24]


def test_the_project_itself_does_not_import_lmms_eval():
    probe = subprocess.run(
        [sys.executable, "-c", "import adsc_llava, adsc_llava.cli, sys; assert 'lmms_eval' not in sys.modules"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr


def adsc_llava_eval(checkpoint: Path, root: Path, env: dict, *options: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "adsc_llava", "eval", str(checkpoint), "--device", "cpu", "--batch-size",
        str(BATCH_SIZE), "--include-path", str(root / "tasks"), "--output-dir", str(root / "runs"),
        "--lmms-eval", str(EVAL_PYTHON.parent / "lmms-eval"), *options,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=6 * RUN_TIMEOUT_S, env=env)


def table_of(stdout: str) -> tuple[list[str], dict]:
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip() for cell in rows[0]]
    return header, {(cells[0].strip(), cells[1].strip()): [cell.strip() for cell in cells] for cells in rows[1:]}


def test_adsc_llava_eval_sweeps_a_group_task_into_a_table_and_a_plot_and_reruns(eval_python, checkpoint, tmp_path):
    env = offline_env(tmp_path / "hf")
    schedule = expected_schedule(checkpoint, "checkpoint")
    prepare_tasks(eval_python, checkpoint, tmp_path, ["vqa", "text"], schedule, env)
    (tmp_path / "tasks" / "tiny_group.yaml").write_text(GROUP_YAML)
    result = adsc_llava_eval(checkpoint, tmp_path, env, "--tasks", "tiny_group", "--budgets", "8", "2", "--methods",
                             "uniform", "fastv", "pyramiddrop", "--plot", str(tmp_path / "scores.png"),
                             "--log-samples", "--model-args", "attn_implementation=eager")  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    header, table = table_of(result.stdout)
    # The group's subtasks, each with its own score.
    assert header[3:] == ["tiny_vqa exact_answer", "tiny_text exact_answer"]
    assert list(table) == [("checkpoint", "checkpoint"), ("ADSC", "8"), ("FastV", "8"), ("PyramidDrop", "8")]
    assert table[("checkpoint", "checkpoint")][3:] == ["0.3333", "0.3333"]  # each first answer is the only one met
    assert table[("FastV", "8")][2] == "[1]" and table[("PyramidDrop", "8")][2] == "[1, 2, 3]"
    assert all(0 <= float(score) <= 1 for cells in table.values() for score in cells[3:])
    # Budget 2 is below what pruning first at layer 1 of 4 reaches (16 tokens / 4 layers): listed, not run.
    assert "left out: FastV 2: its layers [1] reach [4, 16)" in result.stdout
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint_run = tmp_path / "runs" / "checkpoint"
    assert len(list(checkpoint_run.glob("**/*_samples_tiny_vqa.jsonl"))) == 1  # --log-samples
    (results_file,) = checkpoint_run.glob("**/*_results.json")
    assert "attn_implementation=eager" in json.loads(results_file.read_text())["config"]["model_args"]

    time.sleep(1.1)  # a second results file per run folder, with a later time stamp
    again = adsc_llava_eval(checkpoint, tmp_path, env, "--tasks", "tiny_group")  # into the same output folder
    assert again.returncode == 0, again.stderr[-4000:]
    assert table_of(again.stdout)[1][("checkpoint", "checkpoint")] == table[("checkpoint", "checkpoint")]
    assert len(list(checkpoint_run.glob("**/*_results.json"))) == 2
    refused = adsc_llava_eval(checkpoint, tmp_path, env, "--tasks", "tiny_vqa", "--model-args", "budget=3")
    assert refused.returncode == 2 and "--model-args cannot set ['budget']" in refused.stderr


def test_an_environment_that_cannot_be_built_fails_with_the_reason(tmp_path):
    """No reachable package index: the build stops at pip, saying so, in seconds; and no build outlives its time."""
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}  # fmt: skip
    start = time.monotonic()
    with pytest.raises(EnvironmentBuildError, match=r"failed \(exit 1\): lmms_eval_env.sh: FAILED: pip install"):
        build_eval_environment(tmp_path / "unreachable", timeout_s=RUN_TIMEOUT_S, env=env)
    assert time.monotonic() - start < RUN_TIMEOUT_S
    with pytest.raises(EnvironmentBuildError, match="did not finish within 0.5 s"):
        build_eval_environment(tmp_path / "too-slow", timeout_s=0.5, env=env)


# Stand-ins for what `eval/lmms_eval_env.sh` installs, so that its choices about torchvision are checked without
# downloading torch: `python3 -m venv` makes a venv whose `pip` only logs its arguments and whose `python` is this
# interpreter without site-packages (nor the working folder), over stub `torch` (a CUDA or a CPU build), `torchvision`
# (loads or not), lmms-eval and the plugin.
STUB_MODULES = {
    "torch/__init__.py": """\
import os
__version__ = os.environ["STUB_TORCH_VERSION"]
class version:
    cuda = os.environ["STUB_TORCH_CUDA"] or None
class cuda:
    device_count = staticmethod(lambda: 0)
""",
    "torchvision/__init__.py": """\
import os
if os.environ["STUB_TORCHVISION_LOADS"] != "1":
    raise RuntimeError("operator torchvision::nms does not exist")
""",
    "lmms_eval/__init__.py": "",
    "lmms_eval/models/__init__.py": "",
    "adsc_llava/__init__.py": "",
    "adsc_llava/lmms_eval_plugin.py": "",
}
STUB_PYTHON3 = """\
#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$STUB_ROOT/pip" "$STUB_ROOT/python" "$3/bin/" && exit 0
fi
exec "$STUB_REAL_PYTHON" "$@"
"""
STUB_PIP = '#!/bin/sh\necho "$@" >> "$STUB_ROOT/pip.log"\n'
STUB_PYTHON = '#!/bin/sh\nPYTHONPATH="$STUB_ROOT/modules" exec "$STUB_REAL_PYTHON" -S -P "$@"\n'


@pytest.mark.parametrize(
    "torch_version, cuda, torchvision_loads, outcome",
    [
        ("2.13.0", "12.8", True, "kept"),  # PyPI's Linux wheel: `--device cuda:0` needs this environment as it is
        ("2.13.0+cpu", "", False, "removed"),  # a local CPU wheel beside PyPI's torchvision
        ("2.13.0+cpu", "", True, "kept"),  # a CPU torchvision (e.g. from PyTorch's CPU index)
        ("2.13.0", "12.8", False, "failed"),  # nothing to fall back on: stop, saying so
    ],
)
def test_the_environment_keeps_torchvision_wherever_it_loads(
    tmp_path, torch_version, cuda, torchvision_loads, outcome
):
    """PyPI's `torch==2.13.0` is the CUDA build, beside which PyPI's torchvision loads: the script keeps it there
    (and wherever it loads), removes it only beside a CPU-only torch, and otherwise stops naming the problem."""
    files = {f"modules/{path}": text for path, text in STUB_MODULES.items()}
    files.update({"bin/python3": STUB_PYTHON3, "pip": STUB_PIP, "python": STUB_PYTHON})
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "STUB_ROOT": str(tmp_path),
        "STUB_REAL_PYTHON": sys.executable,
        "STUB_TORCH_VERSION": torch_version,
        "STUB_TORCH_CUDA": cuda,
        "STUB_TORCHVISION_LOADS": str(int(torchvision_loads)),
    }
    if outcome == "failed":
        expected = f"FAILED: torchvision does not load beside torch {torch_version}"
        with pytest.raises(EnvironmentBuildError, match=expected):
            build_eval_environment(tmp_path / "venv", timeout_s=60, env=env)
        return
    output = build_eval_environment(tmp_path / "venv", timeout_s=60, env=env)
    pip_calls = (tmp_path / "pip.log").read_text().splitlines()
    assert pip_calls[0].startswith("install -q -c ") and pip_calls[0].endswith("[eval]")
    assert pip_calls[1:] == ([] if outcome == "kept" else ["uninstall -q -y torchvision"])
    assert f"ready: torch {torch_version}, CUDA {cuda or None}, GPUs 0" in output


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
    expected = prepare_tasks(eval_python, checkpoint, tmp_path, ["vqa"], loaded["schedule"], env)["vqa"]
    output_path = run_lmms_eval(eval_python, f"pretrained={checkpoint},budget={budget}", ["tiny_vqa"], tmp_path, env)
    assert_answers_and_metric(output_path, "vqa", expected)
