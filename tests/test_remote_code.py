"""Remote code: a saved ADSC checkpoint loads, predicts and pushes in a fresh Python process without this project.

The checkpoint is saved here, from the in-memory model; everything else runs once in a child interpreter (`-I`,
isolated) whose import system hides `adsc_llava`, `train` and the two top-level modeling files, so the only ADSC code
it can run is the copy shipped inside the checkpoint (loaded by transformers as `transformers_modules.*`). The child
writes what it saw to files that the tests below compare with the in-memory model.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

import adsc_llava
from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.testing import PROMPT_WORDS, SPECIAL_TOKENS, build_tiny_processor, tiny_llava_config_for

from conftest import run_fresh_process

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FILES = ("configuration_adsc_llava.py", "modeling_adsc_llava.py")
PROJECT_MODULES = (
    "adsc_llava",
    "train",
    "configuration_adsc_llava",
    "modeling_adsc_llava",
    "configuration_adsc_llava_next",
    "modeling_adsc_llava_next",
    "configuration_adsc_llava_onevision",
    "modeling_adsc_llava_onevision",
    "configuration_adsc_qwen2_5_vl",
    "modeling_adsc_qwen2_5_vl",
    "configuration_adsc_qwen3_vl",
    "modeling_adsc_qwen3_vl",
    "processing_qwen_images",
)
AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForImageTextToText")
NEW_TOKENS = 4

QUESTION = "what is in the image ?"
PROMPTS = ("USER: <image>\nwhat color is the square ? ASSISTANT:", "USER: how many circle ? ASSISTANT:")

# Runs in the child: `python -I child.py WORKDIR`. Reads WORKDIR/request.json, writes WORKDIR/report.json and tensors.
CHILD_SCRIPT = r'''
import importlib.util
import json
import sys
import types
from pathlib import Path

request = json.loads((Path(sys.argv[1]) / "request.json").read_text())
workdir, checkpoint = Path(sys.argv[1]), request["checkpoint"]


class HideProject:
    """Meta-path finder in front of all others: the project's modules cannot be imported, however installed."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.split(".")[0] in request["project_modules"]:
            raise ModuleNotFoundError(f"{fullname} is hidden from this process", name=fullname)
        return None


# The editable install's finder is removed too, so that nothing maps the project's names to its source tree.
sys.meta_path[:] = [HideProject] + [
    finder for finder in sys.meta_path if not getattr(finder, "__module__", "").startswith("__editable__")
]
report = {"importable": {}}
for name in request["project_modules"]:
    try:
        __import__(name)
        report["importable"][name] = True
    except ModuleNotFoundError:
        report["importable"][name] = False

import torch  # noqa: E402
from huggingface_hub import HfApi, ModelCard  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, pipeline  # noqa: E402
from unittest import mock  # noqa: E402

torch.set_num_threads(request["num_threads"])
inputs = torch.load(workdir / "inputs.pt")

config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
report["config"] = {
    "class": type(config).__name__,
    "module": type(config).__module__,
    "vision_tokens_per_layer": config.vision_tokens_per_layer(),
}
report["models"] = {}
for auto_class in (AutoModelForImageTextToText, AutoModel):
    model = auto_class.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save(logits, workdir / f"logits_{auto_class.__name__}.pt")
    report["models"][auto_class.__name__] = {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "can_generate": model.can_generate(),
    }

image = Image.open(workdir / "image.png")
content = [{"type": "image", "image": image}, {"type": "text", "text": request["question"]}]
messages = [{"role": "user", "content": content}]
pipe = pipeline("image-text-to-text", model=checkpoint, trust_remote_code=True)
answer = pipe(text=messages, return_full_text=False, generate_kwargs=request["generate_kwargs"])
report["pipeline"] = {"model_module": type(pipe.model).__module__, "generated_text": answer[0]["generated_text"]}

# push_to_hub with the network calls mocked: record every file of the commit.
pushed_dir = workdir / "pushed"
pushed_dir.mkdir()


def create_repo(self, repo_id, **kwargs):
    return types.SimpleNamespace(repo_id=repo_id)


def create_commit(self, repo_id, operations, **kwargs):
    for operation in operations:
        (pushed_dir / operation.path_in_repo).write_bytes(Path(operation.path_or_fileobj).read_bytes())
    report["pushed"] = {"repo_id": repo_id, "files": sorted(operation.path_in_repo for operation in operations)}
    return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


card = ModelCard("---\nlibrary_name: transformers\n---\n# tiny ADSC-LLaVA\n")
with (
    mock.patch.object(HfApi, "create_repo", create_repo),
    mock.patch.object(HfApi, "create_commit", create_commit),
    mock.patch.object(ModelCard, "load", return_value=card),
):
    model.push_to_hub(request["repo_id"])

source_paths = tuple(request["project_source_paths"])
report["project_modules_loaded"] = sorted(
    name for name, module in sys.modules.items() if (getattr(module, "__file__", None) or "").startswith(source_paths)
)
(workdir / "report.json").write_text(json.dumps(report))
'''


def drawn_image() -> Image.Image:
    image = Image.new("RGB", (40, 36), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 6, 22, 24), fill="red")
    draw.ellipse((20, 14, 36, 30), fill="blue")
    return image


def suppressed_token_ids(tokenizer) -> list[int]:
    """Special tokens and prompt words: with these suppressed every generated token is a plain word."""
    return tokenizer.convert_tokens_to_ids([*SPECIAL_TOKENS, *PROMPT_WORDS])


def reference_answer(model, processor, image: Image.Image, generate_kwargs: dict) -> str:
    """What the pipeline should answer: chat template -> processor -> greedy generate -> decode the new tokens."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, **generate_kwargs)
    return processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def project_source_paths() -> list[str]:
    """Files and folders the project's code is imported from here (the source tree, or an installed package)."""
    folders = ("adsc_llava", "train", "benchmarks", "examples")
    paths = [*(PROJECT_ROOT / name for name in folders), *(PROJECT_ROOT / name for name in SHIPPED_FILES)]
    paths += [Path(adsc_llava.__file__).parent]
    return sorted({str(path) for path in paths})


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> SimpleNamespace:
    """Save a tiny pruned ADSC model + processor, run the fresh process once, return both sides' results."""
    workdir = tmp_path_factory.mktemp("remote_code")
    checkpoint = workdir / "checkpoint"
    processor = build_tiny_processor()
    config = AdscLlavaConfig.from_llava_config(tiny_llava_config_for(processor), pruning_layers=[1, 2], drop_ratio=0.5)
    torch.manual_seed(0)
    model = AdscLlavaForConditionalGeneration(config).eval()
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)

    image = drawn_image()
    image.save(workdir / "image.png")
    # One image row and one text-only row, left padded: pruning, padding and a row with nothing to prune.
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=[image], text=list(PROMPTS), padding=True, return_tensors="pt"))
    torch.save(inputs, workdir / "inputs.pt")
    generate_kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        suppress_tokens=suppressed_token_ids(processor.tokenizer),
    )
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        expected_answer = reference_answer(model, processor, image, generate_kwargs)

    report = run_fresh_process(
        CHILD_SCRIPT,
        workdir,
        {
            "checkpoint": str(checkpoint),
            "project_modules": PROJECT_MODULES,
            "project_source_paths": project_source_paths(),
            "num_threads": torch.get_num_threads(),
            "question": QUESTION,
            "generate_kwargs": generate_kwargs,
            "repo_id": "someone/tiny-adsc-llava",
        },
    )
    return SimpleNamespace(
        workdir=workdir,
        checkpoint=checkpoint,
        model=model,
        inputs=inputs,
        expected_logits=expected_logits,
        expected_answer=expected_answer,
        report=report,
    )


def test_save_pretrained_ships_both_modeling_files_and_auto_map(remote):
    for name in SHIPPED_FILES:
        assert (remote.checkpoint / name).read_bytes() == (PROJECT_ROOT / name).read_bytes()
    saved_config = json.loads((remote.checkpoint / "config.json").read_text())
    assert saved_config["auto_map"] == {
        "AutoConfig": "configuration_adsc_llava.AdscLlavaConfig",
        "AutoModel": "modeling_adsc_llava.AdscLlavaForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_adsc_llava.AdscLlavaForConditionalGeneration",
    }
    assert saved_config["adsc_pruning_layers"] == [1, 2] and saved_config["adsc_drop_ratio"] == 0.5


def test_fresh_process_cannot_import_the_project(remote):
    assert remote.report["importable"] == dict.fromkeys(PROJECT_MODULES, False)
    assert remote.report["project_modules_loaded"] == []


def test_auto_classes_load_the_checkpoint_code(remote):
    config = remote.report["config"]
    assert config["class"] == "AdscLlavaConfig" and config["module"].startswith("transformers_modules.")
    assert config["vision_tokens_per_layer"] == remote.model.config.vision_tokens_per_layer()
    for auto_class in ("AutoModelForImageTextToText", "AutoModel"):
        loaded = remote.report["models"][auto_class]
        # AutoModel gives the generation class too (lmms-eval loads with AutoModel, then generates).
        assert loaded["class"] == "AdscLlavaForConditionalGeneration", auto_class
        assert loaded["module"].startswith("transformers_modules.") and loaded["can_generate"], auto_class


@pytest.mark.parametrize("auto_class", ["AutoModelForImageTextToText", "AutoModel"])
def test_remote_code_logits_identical_to_in_memory_model(remote, auto_class):
    logits = torch.load(remote.workdir / f"logits_{auto_class}.pt")
    assert logits.shape == remote.expected_logits.shape
    assert torch.equal(logits, remote.expected_logits)


def test_pipeline_answers_with_remote_code(remote):
    pipeline_run = remote.report["pipeline"]
    assert pipeline_run["model_module"].startswith("transformers_modules.")
    answer_words = pipeline_run["generated_text"].split()
    assert len(answer_words) == NEW_TOKENS
    assert answer_words == remote.expected_answer.split()


def test_push_to_hub_uploads_both_modeling_files(remote):
    pushed = remote.report["pushed"]
    assert pushed["repo_id"] == "someone/tiny-adsc-llava"
    assert {"config.json", "model.safetensors", *SHIPPED_FILES} <= set(pushed["files"])
    for name in SHIPPED_FILES:
        assert (remote.workdir / "pushed" / name).read_bytes() == (PROJECT_ROOT / name).read_bytes()
    pushed_config = json.loads((remote.workdir / "pushed" / "config.json").read_text())
    assert set(pushed_config["auto_map"]) == set(AUTO_CLASSES)
    assert pushed_config["auto_map"]["AutoModel"] == "modeling_adsc_llava.AdscLlavaForConditionalGeneration"
