"""The built wheel, installed into a fresh virtual environment, works without the source tree.

One module-scoped fixture builds the wheel from a clean copy of the repository (what CI checks out: no `build/`, no
`*.egg-info`, whose stale files setuptools would ship), creates a new virtual environment and installs the wheel
there with the project's constraints. Every command then runs in a temporary working directory with an environment
free of `PYTHON*` variables (and `python -I` where the interpreter is called directly), so only the venv's
site-packages can supply `adsc_llava`.

The end-to-end fixture uses the installed package alone: its `adsc_llava.testing` builds a tiny llava-hf folder and a
tiny LLaVA-665K style data set, `adsc-llava convert` and `adsc-llava train` (3 steps, one per phase of the reverse
curriculum) turn them into a trained ADSC checkpoint, and a fresh process that cannot import `adsc_llava` loads it as
remote code and generates.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_packaging import setup_constant

from adsc_llava.cost import format_schedule
from adsc_llava.testing import PROMPT_WORDS, SPECIAL_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("convert", "cost", "bench", "train", "demo", "serve", "eval")
# Subpackage -> its folder in the source tree (as in setup.py's package_dir).
SUBPACKAGE_FOLDERS = {"train": "train", "benchmarks": "benchmarks", "shapes_demo": "examples/shapes_demo"}
SHIPPED_FILES = setup_constant("SHIPPED_FILES")
# Top-level names that the old layout installed or a source checkout exposes; the wheel must install none of them.
FOREIGN_TOP_LEVEL = ("train", "benchmarks", "shapes_demo", "examples", "configuration_adsc_llava",
                     "modeling_adsc_llava")  # fmt: skip
# What the clean copy of the repository leaves out: what git ignores, and git's own metadata.
NOT_COPIED = (".git", *(line.strip().rstrip("/") for line in (REPO_ROOT / ".gitignore").read_text().splitlines()
                        if line.strip() and not line.startswith("#")))  # fmt: skip
# pip output meaning that no package index could be reached (the only reason to skip).
NO_INDEX = re.compile(
    r"NewConnectionError|Could not fetch URL|Temporary failure in name resolution|Network is unreachable|"
    r"ProxyError|Max retries exceeded|Failed to establish a new connection"
)

BUDGET = 8.0  # average vision tokens per LLM layer, of 16
NUM_VISION_TOKENS = 16  # 32 px images, 8 px patches
NEW_TOKENS = 4
MAX_STEPS = 3  # the fewest a 3-phase (reverse) curriculum accepts: one step per phase
WORDS = ("what", "color", "shape", "is", "the", "it", "in", "image", "?", "a", "red", "blue", "green", "square",
         "circle", "and")  # fmt: skip
PROMPT = "USER: <image>\nwhat color is the shape ? ASSISTANT:"
DRAWINGS = [("red", "square"), ("blue", "circle"), ("green", "square"), ("red", "circle")]
RECORDS = [
    {
        "id": f"record_{index}",
        "image": f"images/{color}_{shape}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape ?"},
            {"from": "gpt", "value": f"{color} {shape}"},
        ],
    }
    for index, (color, shape) in enumerate(DRAWINGS)
]

# Runs in the new venv: `python -I build.py WORKDIR`. A tiny stock llava-hf folder, the data set and a query image,
# built with the INSTALLED package's `adsc_llava.testing`.
BUILD_SCRIPT = r"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration

import adsc_llava
from adsc_llava.testing import build_tiny_processor, tiny_llava_config_for

workdir = Path(sys.argv[1])
request = json.loads((workdir / "request.json").read_text())


def draw(color, shape):
    image = Image.new("RGB", (40, 36), "white")
    kind = "rectangle" if shape == "square" else "ellipse"
    getattr(ImageDraw.Draw(image), kind)((6, 5, 30, 29), fill=color)
    return image


processor = build_tiny_processor(request["words"], image_size=32, patch_size=8)
torch.manual_seed(0)
model = LlavaForConditionalGeneration(tiny_llava_config_for(processor, 32, 8))
model.save_pretrained(workdir / "base")
processor.save_pretrained(workdir / "base")
(workdir / "data" / "images").mkdir(parents=True)
for record in request["records"]:
    color, shape = Path(record["image"]).stem.split("_")
    draw(color, shape).save(workdir / "data" / record["image"])
(workdir / "data" / "train.json").write_text(json.dumps(request["records"]))
draw("blue", "square").save(workdir / "query.png")
(workdir / "build_report.json").write_text(json.dumps({"adsc_llava": adsc_llava.__file__}))
"""

# Runs in the new venv: `python -I load.py WORKDIR`, offline with a fresh HF_HOME. `adsc_llava` is installed there
# but hidden from the import system, so the only ADSC code it can run is the copy shipped inside the checkpoint.
LOAD_SCRIPT = r"""
import importlib.util
import json
import sys
from pathlib import Path

workdir = Path(sys.argv[1])
request = json.loads((workdir / "request.json").read_text())
report = {"installed_at": importlib.util.find_spec("adsc_llava").origin}


class HideProject:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.split(".")[0] in request["hidden"]:
            raise ModuleNotFoundError(f"{fullname} is hidden from this process", name=fullname)
        return None


sys.meta_path.insert(0, HideProject)
try:
    import adsc_llava  # noqa: F401

    report["adsc_llava_importable"] = True
except ModuleNotFoundError:
    report["adsc_llava_importable"] = False

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

torch.set_num_threads(1)
model = AutoModelForImageTextToText.from_pretrained(request["checkpoint"], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(request["checkpoint"])
inputs = processor(images=Image.open(workdir / "query.png"), text=request["prompt"], return_tensors="pt")

lengths = {}  # layer -> sequence length in the first (prefill) forward


def length_hook(index):
    def hook(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        lengths.setdefault(index, hidden_states.shape[1])

    return hook


for index, layer in enumerate(model.model.language_model.layers):
    layer.register_forward_pre_hook(length_hook(index), with_kwargs=True)
suppress = processor.tokenizer.convert_tokens_to_ids(request["suppress_tokens"])
with torch.no_grad():
    output = model.generate(
        **inputs,
        max_new_tokens=request["new_tokens"],
        min_new_tokens=request["new_tokens"],
        do_sample=False,
        suppress_tokens=suppress,
    )
report.update(
    model_class=type(model).__name__,
    model_module=type(model).__module__,
    config_module=type(model.config).__module__,
    vision_tokens_per_layer=model.config.vision_tokens_per_layer(),
    average_vision_tokens=model.config.average_vision_tokens(),
    vocab_size=model.config.text_config.vocab_size,
    image_token_id=model.config.image_token_id,
    suppressed_ids=suppress,
    input_ids=inputs["input_ids"].tolist(),
    output_ids=output.tolist(),
    prefill_lengths=[lengths[index] for index in sorted(lengths)],
    project_modules_loaded=sorted(
        name for name in sys.modules if name.split(".")[0] in request["hidden"]
    ),
)
(workdir / "load_report.json").write_text(json.dumps(report))
"""


def child_env(venv: Path, hf_home: Path) -> dict[str, str]:
    """The environment of every command run in the venv: no PYTHONPATH & co., offline, one thread, fresh HF cache."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_", "VIRTUAL_ENV"))
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run(command: list, cwd: Path, env: dict[str, str], timeout_s: float, check: bool = True):
    """Run `command` and return the completed process; fail the test with its output if `check` and it fails."""
    completed = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if check and completed.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} failed (exit {completed.returncode}):\n"
            f"{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}"
        )
    return completed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The wheel built from a clean copy of the repository, installed into a new venv with the CI constraints (the venv
    is deleted afterwards)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*NOT_COPIED))
    build_env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    wheel_dir = root / "dist"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheel_dir, source],
        root,
        build_env,
        timeout_s=180,
        check=False,
    )
    if built.returncode != 0 and NO_INDEX.search(built.stdout + built.stderr):
        pytest.skip("pip cannot reach a package index to fetch the build backend")
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout[-2000:]}\n{built.stderr[-4000:]}"
    (wheel,) = wheel_dir.glob("adsc_llava-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv], root, build_env, timeout_s=120)
    python = venv / "bin" / "python"
    installed_ = run(
        [python, "-m", "pip", "install", "-c", REPO_ROOT / "constraints.txt", wheel],
        root,
        build_env,
        timeout_s=300,
        check=False,
    )
    if installed_.returncode != 0 and NO_INDEX.search(installed_.stdout + installed_.stderr):
        pytest.skip("pip cannot reach a package index to install the wheel's dependencies")
    assert installed_.returncode == 0, f"pip install failed:\n{installed_.stdout[-2000:]}\n{installed_.stderr[-4000:]}"

    workdir = root / "cwd"  # an empty working directory: nothing importable in it
    workdir.mkdir()
    env = child_env(venv, root / "hf_home")
    purelib = run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], workdir, env, 60)
    yield SimpleNamespace(
        root=root,
        wheel=wheel,
        venv=venv,
        python=python,
        script=venv / "bin" / "adsc-llava",
        site_packages=Path(purelib.stdout.strip()).resolve(),
        workdir=workdir,
        env=env,
    )
    shutil.rmtree(venv, ignore_errors=True)  # ~1.2 GB (torch); pytest keeps the last three temporary roots


def test_wheel_holds_one_package_with_every_subpackage_and_shipped_file(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
        assert wheel.read(top_level).decode().split() == ["adsc_llava"]
    assert {name.split("/")[0] for name in names} == {"adsc_llava", top_level.split("/")[0]}
    for name in SHIPPED_FILES:
        assert f"adsc_llava/{name}" in names
    assert {"adsc_llava/configs/llava-1.5-7b.json", "adsc_llava/train/zero3.json"} <= names  # package data
    # Each subpackage is exactly its source folder's modules: nothing forgotten, nothing stale.
    for subpackage, folder in SUBPACKAGE_FOLDERS.items():
        shipped = {name.split("/")[-1] for name in names if re.fullmatch(rf"adsc_llava/{subpackage}/[^/]+\.py", name)}
        assert shipped == {path.name for path in (REPO_ROOT / folder).glob("*.py")}, subpackage


def test_console_script_and_module_list_the_subcommands(installed):
    assert installed.script.is_file()
    for command in ([installed.script, "--help"], [installed.python, "-I", "-m", "adsc_llava", "--help"]):
        completed = run(command, installed.workdir, installed.env, timeout_s=60)
        assert "usage: adsc-llava" in completed.stdout
        listed = re.findall(r"^ {4}(\w+) ", completed.stdout, flags=re.MULTILINE)
        assert listed == list(SUBCOMMANDS), completed.stdout


def test_only_adsc_llava_is_installed_and_its_subpackages_import_from_the_venv(installed):
    no_train = run([installed.python, "-I", "-c", "import train"], installed.workdir, installed.env, 60, check=False)
    assert no_train.returncode != 0
    assert "No module named 'train'" in no_train.stderr

    script = (
        "import importlib, importlib.util, json, sys\n"
        f"foreign = {list(FOREIGN_TOP_LEVEL)!r}\n"
        "modules = ['adsc_llava', 'adsc_llava.train.trainer', 'adsc_llava.benchmarks.speed', "
        "'adsc_llava.shapes_demo.run']\n"
        "report = {'found': [name for name in foreign if importlib.util.find_spec(name) is not None]}\n"
        "report['files'] = {name: importlib.import_module(name).__file__ for name in modules}\n"
        "report['model_card'] = str(importlib.import_module('adsc_llava').shipped_file('model_card.md'))\n"
        "print(json.dumps(report))\n"
    )
    completed = run([installed.python, "-I", "-c", script], installed.workdir, installed.env, timeout_s=120)
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["found"] == [], f"top-level modules installed besides adsc_llava: {report['found']}"
    package_dir = installed.site_packages / "adsc_llava"
    for path in [*report["files"].values(), report["model_card"]]:
        assert Path(path).resolve().is_relative_to(package_dir), path


@pytest.fixture(scope="module")
def trained(installed) -> SimpleNamespace:
    """Build a tiny llava-hf folder, convert it, train 2 steps and load the result in a fresh process, all with the
    installed package alone."""
    workdir = installed.root / "e2e"
    workdir.mkdir()
    (workdir / "request.json").write_text(json.dumps({"words": WORDS, "records": RECORDS}))
    (workdir / "build.py").write_text(BUILD_SCRIPT)
    run([installed.python, "-I", workdir / "build.py", workdir], workdir, installed.env, timeout_s=120)
    build_report = json.loads((workdir / "build_report.json").read_text())

    converted = run(
        [installed.script, "convert", workdir / "base", workdir / "adsc", "--budget", BUDGET],
        workdir,
        installed.env,
        timeout_s=120,
    )
    options = {
        "--model": workdir / "adsc",
        "--data": workdir / "data" / "train.json",
        "--output-dir": workdir / "out",
        "--max-steps": MAX_STEPS,
        "--per-device-train-batch-size": 2,
        "--budget": BUDGET,
        "--save-steps": 1000,
        "--lora-r": 4,
        "--lora-alpha": 8,
        "--gradient-checkpointing": "false",
        "--report-to": "none",
        "--logging-steps": 1,
        "--disable-tqdm": "true",
    }
    trained_ = run(
        [installed.script, "train", *[part for option in options.items() for part in option]],
        workdir,
        installed.env,
        timeout_s=240,
    )
    final = workdir / "out" / "final"

    load_dir = workdir / "load"
    load_dir.mkdir()
    shutil.copy(workdir / "query.png", load_dir / "query.png")
    request = {
        "checkpoint": str(final),
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "suppress_tokens": [*SPECIAL_TOKENS, *PROMPT_WORDS],
        "hidden": ["adsc_llava", *FOREIGN_TOP_LEVEL],
    }
    (load_dir / "request.json").write_text(json.dumps(request))
    (load_dir / "load.py").write_text(LOAD_SCRIPT)
    load_env = child_env(installed.venv, load_dir / "hf_home")
    run([installed.python, "-I", load_dir / "load.py", load_dir], load_dir, load_env, timeout_s=120)
    return SimpleNamespace(
        final=final,
        build_report=build_report,
        convert_output=converted.stdout,
        train_output=trained_.stdout + trained_.stderr,
        load=json.loads((load_dir / "load_report.json").read_text()),
        load_dir=load_dir,
    )


def test_end_to_end_runs_on_the_installed_package(installed, trained):
    package_dir = installed.site_packages / "adsc_llava"
    assert Path(trained.build_report["adsc_llava"]).resolve().is_relative_to(package_dir)
    assert "Wrote the ADSC-LLaVA checkpoint" in trained.convert_output
    config = json.loads((trained.final / "config.json").read_text())
    assert config["model_type"] == "adsc_llava"
    assert config["adsc_drop_ratio"] > 0 and config["adsc_pruning_layers"]
    for name in ("configuration_adsc_llava.py", "modeling_adsc_llava.py"):
        assert (trained.final / name).is_file()


def test_model_card_names_the_schedule(trained):
    card_file = trained.final / "README.md"
    assert card_file.is_file()
    card = card_file.read_text(encoding="utf-8")
    config = json.loads((trained.final / "config.json").read_text())
    assert "$" not in card.split("```")[0], "unsubstituted template field"
    assert f"| {config['adsc_pruning_layers']} |" in card
    assert f"| {config['adsc_drop_ratio']:.4f} |" in card
    assert f"| {format_schedule(trained.load['vision_tokens_per_layer'])} |" in card
    assert f"| {trained.load['average_vision_tokens']:.1f} |" in card
    assert "budget curriculum: reverse" in card
    assert f"optimizer steps: {MAX_STEPS}" in card


def test_trained_checkpoint_loads_as_remote_code_and_generates(installed, trained):
    load = trained.load
    # adsc_llava is installed in the venv, but the child could not import it: the model is the checkpoint's copy.
    assert Path(load["installed_at"]).resolve().is_relative_to(installed.site_packages / "adsc_llava")
    assert load["adsc_llava_importable"] is False
    assert load["project_modules_loaded"] == []
    assert load["model_class"] == "AdscLlavaForConditionalGeneration"
    assert load["model_module"].startswith("transformers_modules."), load["model_module"]
    assert load["config_module"].startswith("transformers_modules."), load["config_module"]
    assert list((trained.load_dir / "hf_home").rglob("modeling_adsc_llava.py")), "no dynamic module cached"

    # The checkpoint really prunes: each layer's prefill sequence is shorter by the vision tokens dropped before it.
    schedule = load["vision_tokens_per_layer"]
    assert schedule[0] == NUM_VISION_TOKENS and schedule[-1] < NUM_VISION_TOKENS
    assert abs(load["average_vision_tokens"] - BUDGET) < 1.0
    full = load["prefill_lengths"][0]
    assert load["prefill_lengths"] == [full - (NUM_VISION_TOKENS - tokens) for tokens in schedule]

    (prompt,), (output,) = load["input_ids"], load["output_ids"]
    assert prompt.count(load["image_token_id"]) == NUM_VISION_TOKENS
    assert len(output) == len(prompt) + NEW_TOKENS
    assert output[: len(prompt)] == prompt
    new = output[len(prompt) :]
    assert all(0 <= token < load["vocab_size"] and token not in load["suppressed_ids"] for token in new), new
