"""End-to-end tests of `adsc-llava train` on a tiny random LLaVA and a tiny drawn data set (CPU).

One module-scoped run (6 steps, reverse curriculum, a checkpoint every 3 steps) is shared by most tests: it goes
through `run_training` with `build_trainer` / `save_trained_weights` wrapped so that the test sees the trainer, the
parameters before and after training, the sequence length every decoder layer receives in each training step, and
what the in-memory PEFT model generates before it is merged. The other runs (resume, interrupted save, CLI with a
mocked hub, adapter) are a few steps each.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, Trainer
from transformers.trainer_utils import get_last_checkpoint

import adsc_llava.train.trainer as trainer_module
from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.configuration_adsc_llava import vision_tokens_per_layer
from adsc_llava.convert import CorruptCheckpointError, convert_checkpoint
from adsc_llava.cost import format_schedule
from adsc_llava.testing import PROMPT_WORDS, SPECIAL_TOKENS, build_tiny_processor, tiny_llava_config_for
from adsc_llava.train import data as data_module
from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.cli import main
from adsc_llava.train.curriculum import phase_at
from adsc_llava.train.data import IGNORE_INDEX
from adsc_llava.train.trainer import run_training

from conftest import run_fresh_process

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FILES = ("configuration_adsc_llava.py", "modeling_adsc_llava.py")
IMAGE_SIZE, PATCH_SIZE = 32, 8
NUM_VISION_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16 per image
BUDGET = 8.0  # of 16: reverse phases at 6.4, 7.2 and 8 tokens per layer on average
MAX_STEPS, SAVE_STEPS = 6, 3  # phases cover steps [0, 2), [2, 4), [4, 6); checkpoint-3 is in the middle of phase 2
LORA_R = 8
LEARNING_RATE, PROJECTOR_LEARNING_RATE = 1e-2, 3e-3
NEW_TOKENS = 5
WORDS = ("what", "color", "shape", "is", "the", "it", "in", "image", "?", "a", "red", "blue", "green", "square",
         "circle", "and")  # fmt: skip
PROMPT = "USER: <image>\nwhat color is the shape ? ASSISTANT:"

# Every record has exactly one image, so a batch loses exactly the dropped tokens of one image per row: the decoder
# layers' sequence lengths then tell how many vision tokens each layer saw, whatever the text padding.
DRAWINGS = {
    "red_square.png": ("red", "rectangle"),
    "blue_circle.png": ("blue", "ellipse"),
    "green_square.png": ("green", "rectangle"),
    "red_circle.png": ("red", "ellipse"),
}
RECORDS = [
    {
        "id": "single",
        "image": "images/red_square.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape ?"},
            {"from": "gpt", "value": "red"},
        ],
    },
    {
        "id": "question_first",
        "image": "images/blue_circle.png",
        "conversations": [
            {"from": "human", "value": "what shape is it ?\n<image>"},
            {"from": "gpt", "value": "circle"},
        ],
    },
    {
        "id": "multi_turn",
        "image": "images/green_square.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape ?"},
            {"from": "gpt", "value": "green"},
            {"from": "human", "value": "and the shape ?"},
            {"from": "gpt", "value": "square"},
        ],
    },
    {
        "id": "long_answer",
        "image": "images/red_circle.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image ?"},
            {"from": "gpt", "value": "a red circle"},
        ],
    },
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: this model is too small to gain from more, and on a busy 2-core machine two threads that
    wait for each other made steps ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw(color: str, kind: str) -> Image.Image:
    image = Image.new("RGB", (40, 36), "white")
    getattr(ImageDraw.Draw(image), kind)((6, 5, 30, 29), fill=color)
    return image


def make_workspace(root: Path, records: list[dict]) -> SimpleNamespace:
    """A tiny random stock LLaVA checkpoint (+ processor) under `root / "base"`, and `records` as a JSON data set
    with the drawn images under `root / "data"`."""
    processor = build_tiny_processor(WORDS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    torch.manual_seed(0)
    base = root / "base"
    LlavaForConditionalGeneration(tiny_llava_config_for(processor, IMAGE_SIZE, PATCH_SIZE)).save_pretrained(base)
    processor.save_pretrained(base)
    (root / "data" / "images").mkdir(parents=True)
    for name, (color, kind) in DRAWINGS.items():
        draw(color, kind).save(root / "data" / "images" / name)
    data = root / "data" / "train.json"
    data.write_text(json.dumps(records))
    return SimpleNamespace(root=root, base=base, data=data, processor=processor)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> SimpleNamespace:
    """A tiny random stock LLaVA checkpoint (+ processor) and a 4-record JSON data set with drawn images."""
    return make_workspace(tmp_path_factory.mktemp("train"), RECORDS)


def train_config(workspace, output_dir: Path, **overrides) -> AdscTrainConfig:
    """The tiny run: batch 4 = the whole data set, so every step trains on the same batch."""
    options = dict(
        model=str(workspace.base),
        data=str(workspace.data),
        output_dir=str(output_dir),
        budget=BUDGET,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        lora_r=LORA_R,
        lora_alpha=2 * LORA_R,
        learning_rate=LEARNING_RATE,
        projector_learning_rate=PROJECTOR_LEARNING_RATE,
        save_steps=SAVE_STEPS,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return AdscTrainConfig(**{**options, **overrides})


class RunRecorder:
    """Wraps `build_trainer` / `save_trained_weights` of `train.trainer` to observe a `run_training` call.

    `lengths[step][layer]` is the set of sequence lengths decoder layer `layer` received during optimizer step
    `step` (0-based; one value expected, seen in the forward and again in the checkpointed recomputation).
    """

    def __init__(self, generate_inputs: dict | None = None, generate_kwargs: dict | None = None):
        self.lengths: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        self.generate_inputs = generate_inputs
        self.generate_kwargs = generate_kwargs
        self.trainer = None

    def install(self, monkeypatch) -> None:
        build_trainer, save_trained_weights = trainer_module.build_trainer, trainer_module.save_trained_weights

        def recording_build_trainer(config, callbacks=None):
            trainer, adsc_model = build_trainer(config, callbacks)
            self.trainer, self.adsc_model = trainer, adsc_model
            self.before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
            self.trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
            for index, layer in enumerate(adsc_model.model.language_model.layers):
                layer.register_forward_pre_hook(self._length_hook(index), with_kwargs=True)
            return trainer, adsc_model

        def recording_save_trained_weights(config, trainer, adsc_model):
            self.after = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
            parameter_names = {id(p): name for name, p in trainer.model.named_parameters()}
            groups = trainer.optimizer.param_groups
            self.initial_lr = {
                parameter_names[id(p)]: group["initial_lr"] for group in groups for p in group["params"]
            }
            self.lr_ratios = {group["lr"] / group["initial_lr"] for group in groups}
            self.drop_ratio_at_end = adsc_model.config.adsc_drop_ratio
            if self.generate_inputs is not None:
                self._generate_unmerged(trainer.model)
            return save_trained_weights(config, trainer, adsc_model)

        monkeypatch.setattr(trainer_module, "build_trainer", recording_build_trainer)
        monkeypatch.setattr(trainer_module, "save_trained_weights", recording_save_trained_weights)

    @property
    def phases(self) -> list:
        """The curriculum's phases, as built when training started."""
        return self.trainer.curriculum.phases

    def _length_hook(self, layer_index: int):
        def hook(module, args, kwargs):
            if module.training:
                hidden_states = args[0] if args else kwargs["hidden_states"]
                self.lengths[self.trainer.state.global_step][layer_index].add(hidden_states.shape[1])

        return hook

    @torch.no_grad()
    def _generate_unmerged(self, model) -> None:
        model.eval()
        self.peft_logits = model(**self.generate_inputs).logits
        self.peft_tokens = model.generate(**self.generate_inputs, **self.generate_kwargs)
        model.train()

    def vision_tokens_seen(self, step: int) -> list[int]:
        """Vision tokens per image each decoder layer saw in `step`: layer 0 sees all of them."""
        per_layer = self.lengths[step]
        assert all(len(lengths) == 1 for lengths in per_layer.values()), f"step {step}: {dict(per_layer)}"
        full = next(iter(per_layer[0]))
        return [NUM_VISION_TOKENS - (full - next(iter(per_layer[layer]))) for layer in sorted(per_layer)]

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.trainer.state.log_history if "loss" in entry]


def suppressed_token_ids(tokenizer) -> list[int]:
    """Special tokens and prompt words: suppressed, a random model cannot emit an `<image>` placeholder."""
    return tokenizer.convert_tokens_to_ids([*SPECIAL_TOKENS, *PROMPT_WORDS])


@pytest.fixture(scope="module")
def run(workspace) -> SimpleNamespace:
    """The shared 6-step run, through `run_training`."""
    image = draw("blue", "rectangle")
    image.save(workspace.root / "query.png")
    inputs = dict(workspace.processor(images=image, text=PROMPT, return_tensors="pt"))
    generate_kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        suppress_tokens=suppressed_token_ids(workspace.processor.tokenizer),
    )
    recorder = RunRecorder(inputs, generate_kwargs)
    config = train_config(workspace, workspace.root / "out")
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder.install(monkeypatch)
        final_dir = run_training(config)
    return SimpleNamespace(
        recorder=recorder, config=config, final_dir=final_dir, inputs=inputs, generate_kwargs=generate_kwargs
    )


# --------------------------------------------------------------------------------------------------------------
# Training: loss, what changes, learning rates
# --------------------------------------------------------------------------------------------------------------


def test_loss_is_finite_and_decreases_on_a_repeated_batch(run):
    losses = run.recorder.losses
    assert len(losses) == MAX_STEPS
    assert all(math.isfinite(loss) for loss in losses)
    # The first step trains at lr 0 (warm-up), so losses[0] is the untrained model's loss on this batch.
    assert losses[-1] < 0.85 * losses[0], losses
    assert losses[1:] == sorted(losses[1:], reverse=True), losses


def test_only_lora_and_the_projector_copy_change(run):
    recorder = run.recorder
    before, after = recorder.before, recorder.after
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora = {name for name in before if ".lora_A." in name or ".lora_B." in name}
    projector_copy = {name for name in before if "multi_modal_projector.modules_to_save." in name}

    assert lora and projector_copy
    assert recorder.trainable == lora | projector_copy
    assert changed == lora | projector_copy  # every trainable tensor moved, nothing else did
    # LoRA sits on all 7 linear layers of each of the 4 language-model layers, and nowhere else.
    lora_modules = {name.split(".lora_")[0] for name in lora}
    assert len(lora_modules) == 4 * 7
    assert all(".language_model.layers." in name for name in lora_modules)
    vision = [name for name in before if ".vision_tower." in name]
    assert vision and not any("lora_" in name for name in vision)
    assert all(torch.equal(before[name], after[name]) for name in vision)
    original_projector = [name for name in before if "multi_modal_projector.original_module." in name]
    assert original_projector and all(torch.equal(before[name], after[name]) for name in original_projector)


def test_projector_has_its_own_learning_rate(run):
    recorder = run.recorder
    assert set(recorder.initial_lr) == recorder.trainable
    for name in recorder.trainable:
        expected = PROJECTOR_LEARNING_RATE if "multi_modal_projector" in name else LEARNING_RATE
        assert recorder.initial_lr[name] == expected, name
    # All groups follow the same schedule: at the end their ratio is still the configured one.
    assert max(recorder.lr_ratios) - min(recorder.lr_ratios) < 1e-9


def test_frozen_weights_in_the_merged_output_are_the_base_checkpoints(run, workspace):
    base = load_file(workspace.base / "model.safetensors")
    final = load_file(run.final_dir / "model.safetensors")
    assert base.keys() == final.keys()
    lora_targets = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
    for name, tensor in base.items():
        if ("language_model" in name and lora_targets.search(name)) or "multi_modal_projector" in name:
            assert not torch.equal(tensor, final[name]), f"{name} did not get the training"
        else:
            assert torch.equal(tensor, final[name]), f"{name} changed"


# --------------------------------------------------------------------------------------------------------------
# Curriculum as seen in forward
# --------------------------------------------------------------------------------------------------------------


def test_budget_seen_in_forward_follows_the_reverse_curriculum(run):
    recorder = run.recorder
    phases = recorder.phases
    assert [phase.factor for phase in phases] == [0.8, 0.9, 1.0]
    assert [(phase.first_step, phase.end_step) for phase in phases] == [(0, 2), (2, 4), (4, 6)]
    assert sorted(recorder.lengths) == list(range(MAX_STEPS))
    config = recorder.adsc_model.config
    num_layers = config.text_config.num_hidden_layers
    seen = {step: recorder.vision_tokens_seen(step) for step in range(MAX_STEPS)}
    for step, tokens in seen.items():
        phase = phase_at(phases, step)
        expected = vision_tokens_per_layer(num_layers, config.adsc_pruning_layers, phase.drop_ratio, NUM_VISION_TOKENS)
        assert tokens == expected, f"step {step} (phase {phase.factor}x)"
        # The largest schedule not above the phase budget.
        assert sum(tokens) / num_layers <= phase.factor * BUDGET
    averages = [sum(seen[phase.first_step]) / num_layers for phase in phases]
    assert averages[0] < averages[1] < averages[2] == BUDGET
    # The phase changes exactly at the boundaries.
    assert seen[0] == seen[1] != seen[2] == seen[3] != seen[4] == seen[5]


def test_every_training_log_carries_the_curriculum_phase_for_the_trackers(run):
    """What the integrations (tensorboard, wandb) receive in `on_log` is what `log_history` keeps."""
    phases = run.recorder.phases
    entries = [entry for entry in run.recorder.trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in entries] == list(range(1, MAX_STEPS + 1))
    for entry in entries:
        phase = phase_at(phases, entry["step"] - 1)  # the step that was just trained
        assert entry["adsc/phase"] == phases.index(phase) + 1
        assert entry["adsc/budget"] == phase.budget and entry["adsc/drop_ratio"] == phase.drop_ratio


def test_final_checkpoint_has_the_target_schedule(run):
    final_phase = run.recorder.phases[-1]
    assert run.recorder.drop_ratio_at_end == final_phase.drop_ratio
    config = AdscLlavaConfig.from_pretrained(run.final_dir)
    assert config.adsc_drop_ratio == final_phase.drop_ratio
    assert config.average_vision_tokens() == BUDGET
    assert config.adsc_pruning_layers == run.recorder.adsc_model.config.adsc_pruning_layers


# --------------------------------------------------------------------------------------------------------------
# Resume and atomic saves
# --------------------------------------------------------------------------------------------------------------


def per_step_log(log_history: list[dict]) -> list[dict]:
    """The per-step entries (loss, grad_norm, learning_rate, epoch, step); not the end-of-run timings."""
    return [entry for entry in log_history if "loss" in entry]


def test_resume_from_a_mid_phase_checkpoint_continues_identically(run, workspace, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(workspace.root / "out" / f"checkpoint-{SAVE_STEPS}", output_dir / f"checkpoint-{SAVE_STEPS}")
    recorder = RunRecorder()
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder.install(monkeypatch)
        final_dir = run_training(train_config(workspace, output_dir, resume=True))

    assert recorder.trainer.state.global_step == MAX_STEPS
    # Only the steps after the checkpoint ran, each in its phase (step 3: 0.9x; steps 4-5: 1.0x).
    assert sorted(recorder.lengths) == list(range(SAVE_STEPS, MAX_STEPS))
    for step in range(SAVE_STEPS, MAX_STEPS):
        assert recorder.vision_tokens_seen(step) == run.recorder.vision_tokens_seen(step)
    resumed_log = per_step_log(recorder.trainer.state.log_history)
    uninterrupted_log = per_step_log(run.recorder.trainer.state.log_history)
    assert [entry["step"] for entry in resumed_log] == list(range(1, MAX_STEPS + 1))
    assert resumed_log == uninterrupted_log
    # The trained weights too, not only the (rounded) logged losses.
    resumed, uninterrupted = load_file(final_dir / "model.safetensors"), load_file(run.final_dir / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


class InterruptedSave(RuntimeError):
    pass


def test_assistant_only_loss_false_supervises_the_prompts_too(workspace, tmp_path):
    image_token_id = workspace.processor.image_token_id
    for assistant_only, expect_prompts_supervised in ((True, False), (False, True)):
        config = train_config(workspace, tmp_path / str(assistant_only), assistant_only_loss=assistant_only)
        trainer, _ = trainer_module.build_trainer(config)
        sample = trainer.train_dataset[0]
        image = sample["input_ids"] == image_token_id
        after_image = torch.nn.functional.pad(image[:-1], (1, 0)) & ~image  # predicted from the image's last token
        text = ~image & ~after_image
        assert bool(after_image.any())
        supervised = sample["labels"] != IGNORE_INDEX
        assert bool(supervised[text].all()) is expect_prompts_supervised
        assert not supervised[image | after_image].any()  # image placeholders and the token after them never


def test_an_interrupted_save_never_becomes_the_last_checkpoint(workspace, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    save_rng_state = Trainer._save_rng_state

    def crash_at_step_2(self, checkpoint_dir):
        save_rng_state(self, checkpoint_dir)
        if self.state.global_step == 2:  # the model and optimizer of checkpoint-2 are written by now
            assert any(Path(checkpoint_dir).glob("*.safetensors"))
            raise InterruptedSave("killed while saving")

    config = train_config(workspace, output_dir, max_steps=2, save_steps=1, curriculum="direct")
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_rng_state", crash_at_step_2)
        with pytest.raises(InterruptedSave):
            run_training(config)

    checkpoints = sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-1"]
    assert get_last_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-1")
    assert (output_dir / "checkpoint-1" / "trainer_state.json").is_file()

    recorder = RunRecorder()
    with monkeypatch.context() as patch:
        recorder.install(patch)
        final_dir = run_training(
            train_config(workspace, output_dir, max_steps=2, save_steps=1, curriculum="direct", resume=True)
        )
    assert sorted(recorder.lengths) == [1]  # resumed after step 1
    assert recorder.trainer.state.global_step == 2
    assert (final_dir / "model.safetensors").is_file()
    assert get_last_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")


def test_a_new_run_into_a_used_output_dir_replaces_its_checkpoints(workspace, tmp_path):
    output_dir = tmp_path / "out"
    stale = output_dir / "checkpoint-1"
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("from an earlier run")
    run_training(train_config(workspace, output_dir, max_steps=1, save_steps=1, curriculum="direct"))
    assert not (stale / "stale.txt").exists()
    assert (stale / "trainer_state.json").is_file()
    assert not (output_dir / "staging").exists()


# --------------------------------------------------------------------------------------------------------------
# Final output: fresh process without the project, model card
# --------------------------------------------------------------------------------------------------------------

# Runs in a child interpreter (`python -I`) whose import system cannot see this project: the editable install's
# finder is removed and every sys.path entry inside the project is dropped, so only the checkpoint's code can run.
CHILD_SCRIPT = r"""
import json
import sys
from pathlib import Path

workdir = Path(sys.argv[1])
request = json.loads((workdir / "request.json").read_text())
project_root = request["project_root"]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
# The virtual environment may live inside the project (.venv): keep it, drop the project's own source folders.
environment = str(Path(sys.prefix).resolve())


def in_project(path):
    path = str(Path(path or ".").resolve())
    return path.startswith(project_root) and not path.startswith(environment)


sys.path[:] = [entry for entry in sys.path if not in_project(entry)]
report = {}
try:
    import adsc_llava  # noqa: F401
    report["adsc_llava_importable"] = True
except ImportError:
    report["adsc_llava_importable"] = False

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

torch.set_num_threads(1)

final_dir = request["final_dir"]
processor = AutoProcessor.from_pretrained(final_dir, trust_remote_code=True)
inputs = dict(processor(images=Image.open(request["image"]), text=request["prompt"], return_tensors="pt"))
model = AutoModelForImageTextToText.from_pretrained(final_dir, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, **request["generate_kwargs"])
torch.save({"input_ids": inputs["input_ids"], "logits": logits, "tokens": tokens}, workdir / "outputs.pt")
report["model_class"] = type(model).__name__
report["model_module"] = type(model).__module__
report["drop_ratio"] = model.config.adsc_drop_ratio
report["project_modules_loaded"] = sorted(
    name for name, module in sys.modules.items() if getattr(module, "__file__", None) and in_project(module.__file__)
)
(workdir / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_process(run, workspace, tmp_path_factory) -> SimpleNamespace:
    workdir = tmp_path_factory.mktemp("fresh_process")
    request = dict(
        project_root=str(PROJECT_ROOT),
        final_dir=str(run.final_dir),
        image=str(workspace.root / "query.png"),
        prompt=PROMPT,
        generate_kwargs=run.generate_kwargs,
    )
    report = run_fresh_process(CHILD_SCRIPT, workdir, request)
    return SimpleNamespace(report=report, outputs=torch.load(workdir / "outputs.pt"))


def test_merged_output_loads_without_the_project_and_generates_like_the_peft_model(run, fresh_process):
    report, outputs = fresh_process.report, fresh_process.outputs
    assert report["adsc_llava_importable"] is False
    assert report["project_modules_loaded"] == []
    assert report["model_class"] == "AdscLlavaForConditionalGeneration"
    assert report["model_module"].startswith("transformers_modules.")
    assert report["drop_ratio"] == run.recorder.phases[-1].drop_ratio
    # The saved processor rebuilds the same prompt.
    assert torch.equal(outputs["input_ids"], run.inputs["input_ids"])
    torch.testing.assert_close(outputs["logits"], run.recorder.peft_logits, rtol=1e-4, atol=1e-4)
    assert outputs["tokens"].shape[1] == run.inputs["input_ids"].shape[1] + NEW_TOKENS
    assert torch.equal(outputs["tokens"], run.recorder.peft_tokens)


def test_final_folder_is_a_remote_code_checkpoint(run):
    files = {path.name for path in run.final_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", *SHIPPED_FILES} <= files
    assert "adapter_config.json" not in files
    # The shipped code itself is exercised by the fresh-process test; here: the right two modules.
    assert "class AdscLlavaConfig(" in (run.final_dir / "configuration_adsc_llava.py").read_text()
    assert "class AdscLlavaForConditionalGeneration(" in (run.final_dir / "modeling_adsc_llava.py").read_text()
    config = json.loads((run.final_dir / "config.json").read_text())
    assert config["model_type"] == "adsc_llava"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_adsc_llava.AdscLlavaForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_adsc_llava.AdscLlavaConfig"


def test_model_card_has_front_matter_and_the_schedule(run):
    card = ModelCard.load(run.final_dir / "README.md")
    metadata = card.data.to_dict()
    assert metadata["license"]
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["base_model"] == run.config.model
    assert "adsc" in metadata["tags"] and "custom_code" in metadata["tags"]
    config = AdscLlavaConfig.from_pretrained(run.final_dir)
    text = card.text
    assert str(config.adsc_pruning_layers) in text
    assert f"{config.adsc_drop_ratio:.4f}" in text
    assert format_schedule(config.vision_tokens_per_layer()) in text
    assert f"{config.average_vision_tokens():.1f}" in text
    assert f"optimizer steps: {MAX_STEPS}" in text
    assert "reverse" in text
    assert "trust_remote_code=True" in text
    assert "$" not in text  # every template field was filled


# --------------------------------------------------------------------------------------------------------------
# CLI, hub, adapter
# --------------------------------------------------------------------------------------------------------------


def test_help_runs_and_lists_dashed_options():
    completed = subprocess.run(
        [sys.executable, "-m", "train", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    for option in ("--output-dir", "--output_dir", "--budget", "--curriculum", "--push-to-hub", "--save-adapter"):
        assert option in completed.stdout


def test_dashes_and_underscores_parse_the_same(workspace, monkeypatch):
    seen = []
    monkeypatch.setattr("adsc_llava.train.cli.run_training", seen.append)
    common = ["--model", "m", "--data", "d.json", "--budget", "192"]
    main([*common, "--output-dir", "out", "--lora-r", "16", "--projector-learning-rate", "1e-5", "--save-adapter"])
    main([*common, "--output_dir", "out", "--lora_r", "16", "--projector_learning_rate", "1e-5", "--save_adapter"])
    assert len(seen) == 2 and seen[0] == seen[1]
    assert (seen[0].output_dir, seen[0].lora_r, seen[0].projector_learning_rate) == ("out", 16, 1e-5)
    assert seen[0].save_adapter is True


def test_push_to_hub_needs_a_repository_id(workspace):
    with pytest.raises(ValueError, match="--hub-model-id"):
        main(["--model", str(workspace.base), "--data", str(workspace.data), "--output-dir", "x", "--push-to-hub"])


def test_cli_run_prints_the_plan_and_pushes_the_final_folder(run, workspace, tmp_path, monkeypatch, capsys):
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        uploads.append(("create_repo", repo_id, kwargs.get("private")))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        uploads.append(("upload", repo_id, Path(folder_path), files))

    def create_commit(self, repo_id, operations, **kwargs):
        uploads.append(("upload", repo_id, None, sorted(operation.path_in_repo for operation in operations)))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    output_dir = tmp_path / "out"
    # fmt: off
    main([
        "--model", str(workspace.base), "--data", str(workspace.data), "--output-dir", str(output_dir),
        "--budget", str(BUDGET), "--max-steps", "3", "--per-device-train-batch-size", "4", "--lora-r", str(LORA_R),
        "--lora-alpha", str(2 * LORA_R), "--save-steps", "100", "--disable-tqdm", "--push-to-hub",
        "--hub-model-id", "me/tiny-adsc", "--base-model-id", "llava-hf/llava-1.5-7b-hf",
        "--dataloader-num-workers", "0",
    ])
    # fmt: on
    card = (output_dir / "final" / "README.md").read_text()
    assert "base_model: llava-hf/llava-1.5-7b-hf" in card and 'from_pretrained("me/tiny-adsc"' in card
    printed = capsys.readouterr().out
    trainable = sum(run.recorder.before[name].numel() for name in run.recorder.trainable)
    assert f"trainable parameters: {trainable:,} of" in printed
    for number, factor in enumerate((0.8, 0.9, 1.0), start=1):
        assert re.search(rf"phase {number}: steps {number - 1}-{number - 1}\s+{factor:g}x -> budget", printed)
    assert str(output_dir / "final") in printed and "trust_remote_code=True" in printed

    assert uploads[0] == ("create_repo", "me/tiny-adsc", True)  # private unless --hub-private-repo false
    (_, repo_id, folder, files) = uploads[-1]
    assert repo_id == "me/tiny-adsc" and folder in (None, output_dir / "final")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", *SHIPPED_FILES} <= set(files)


def test_a_corrupt_base_checkpoint_is_refused_before_training(workspace, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(workspace.base, corrupt)
    weights = load_file(corrupt / "model.safetensors")
    name = next(key for key in weights if "multi_modal_projector.linear_1.weight" in key)
    weights[name] = weights[name][:, :-1].contiguous()  # wrong shape
    save_file(weights, corrupt / "model.safetensors", metadata={"format": "pt"})
    config = train_config(workspace, tmp_path / "out", model=str(corrupt), max_steps=1, curriculum="direct")
    with pytest.raises(CorruptCheckpointError, match="tensors of the wrong shape: .*multi_modal_projector.linear_1"):
        run_training(config)
    assert not (tmp_path / "out" / "final").exists()


def test_save_adapter_keeps_the_adapter(workspace, tmp_path):
    output_dir = tmp_path / "out"
    final_dir = run_training(
        train_config(workspace, output_dir, max_steps=1, save_steps=100, curriculum="direct", save_adapter=True)
    )
    files = {path.name for path in final_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "README.md", *SHIPPED_FILES} <= files
    assert "model.safetensors" not in files
    adapter = load_file(final_dir / "adapter_model.safetensors")
    assert any("lora_A" in name for name in adapter) and any("multi_modal_projector" in name for name in adapter)
    config = AdscLlavaConfig.from_pretrained(final_dir)
    assert config.average_vision_tokens() == BUDGET
    # The adapter applies to the base checkpoint loaded as ADSC-LLaVA with the saved schedule.
    base = AdscLlavaForConditionalGeneration.from_pretrained(workspace.base, config=config)
    model = PeftModel.from_pretrained(base, final_dir)
    assert sum("lora_A" in name for name, _ in model.named_parameters()) == 4 * 7


# --------------------------------------------------------------------------------------------------------------
# Options as real runs use them: TrainingArguments, evaluation, the step count, data conventions, ADSC sources
# --------------------------------------------------------------------------------------------------------------


def test_trainer_options_pass_through_the_command_line(monkeypatch):
    seen = []
    monkeypatch.setattr("adsc_llava.train.cli.run_training", seen.append)
    # fmt: off
    main([
        "--model", "m", "--data", "d.json", "--output-dir", "out", "--ddp-timeout", "7200", "--max-grad-norm", "0.3",
        "--run-name", "adsc-192", "--report-to", "tensorboard", "wandb", "--optim", "adamw_torch", "--eval-data",
        "held_out.json", "--deepspeed", "zero3", "--hub-private-repo", "false", "--gradient-checkpointing", "false",
    ])
    # fmt: on
    args = seen[0].trainer_arguments()
    assert (args.ddp_timeout, args.max_grad_norm, args.run_name, args.optim) == (7200, 0.3, "adsc-192", "adamw_torch")
    assert args.report_to == ["tensorboard", "wandb"]
    assert args.eval_strategy == "steps" and args.eval_steps == args.save_steps  # --eval-data evaluates
    assert Path(args.deepspeed) == PROJECT_ROOT / "train" / "zero3.json"  # the shipped config, by name
    assert args.activation_checkpointing is False and seen[0].hub_private_repo is False
    assert args.push_to_hub is False  # the Trainer never pushes checkpoints; --push-to-hub uploads the final model


def test_defaults_follow_llavas_lora_recipe():
    config = AdscTrainConfig(model="m", data="d.json", output_dir="out")
    args = config.trainer_arguments()
    assert (args.learning_rate, args.per_device_train_batch_size, args.lr_scheduler_type) == (2e-4, 16, "cosine")
    assert args.warmup_steps == 0.03 and args.dataloader_num_workers == 4
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert config.group_by_modality_length is None  # on for mixed data (`AdscTrainer._get_train_sampler`)
    assert config.truncate_long_samples and config.hub_private_repo and args.report_to == []


def test_the_curriculum_is_built_for_the_trainers_own_step_count(workspace, tmp_path):
    """With `--dataloader-drop-last` an epoch of 4 records in batches of 3 is one step, not the 2 a re-derivation from
    the data set size would count: the phases still cover exactly the steps the Trainer runs, one each."""
    recorder = RunRecorder()
    config = train_config(workspace, tmp_path / "out", max_steps=-1, num_train_epochs=3, per_device_train_batch_size=3,
                          dataloader_drop_last=True, save_steps=100)  # fmt: skip
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder.install(monkeypatch)
        final_dir = run_training(config)
    assert recorder.trainer.state.max_steps == recorder.trainer.state.global_step == 3
    assert [(phase.first_step, phase.end_step) for phase in recorder.phases] == [(0, 1), (1, 2), (2, 3)]
    drop_ratios = [entry["adsc/drop_ratio"] for entry in per_step_log(recorder.trainer.state.log_history)]
    assert drop_ratios == [phase.drop_ratio for phase in recorder.phases]
    assert AdscLlavaConfig.from_pretrained(final_dir).average_vision_tokens() == BUDGET


def test_a_held_out_split_is_evaluated_during_training(workspace, tmp_path):
    recorder = RunRecorder()
    config = train_config(workspace, tmp_path / "out", max_steps=4, eval_data=str(workspace.data), eval_steps=2,
                          save_steps=100, curriculum="direct")  # fmt: skip
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder.install(monkeypatch)
        run_training(config)
    evaluations = [entry for entry in recorder.trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    losses = [entry["eval_loss"] for entry in evaluations]
    assert all(math.isfinite(loss) for loss in losses) and losses[1] < losses[0]  # the training data itself
    assert (tmp_path / "out" / "eval-data-scan.json").is_file()


def test_the_attention_implementation_is_an_option(workspace, tmp_path):
    trainer, adsc_model = trainer_module.build_trainer(
        train_config(workspace, tmp_path / "out", attn_implementation="eager", scan_data=False)
    )
    assert adsc_model.config._attn_implementation == "eager"
    assert trainer_module.default_attn_implementation() == "sdpa"  # no CUDA here: flash-attn is never picked


LLAVA_STYLE_RECORDS = [
    {  # opens with an answer, as some ShareGPT records do: LLaVA drops that turn
        "id": "leading_answer",
        "image": "images/red_square.png",
        "conversations": [
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "<image>\nwhat color is the shape ?"},
            {"from": "gpt", "value": "red"},
        ],
    },
    {  # longer than --max-length 40: truncated, as LLaVA truncates
        "id": "overlong",
        "image": "images/blue_circle.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat shape is it ?"},
            {"from": "gpt", "value": " ".join(["a blue circle"] * 10)},
        ],
    },
    {"id": "missing", "image": "images/nowhere.png", "conversations": RECORDS[0]["conversations"]},
]


def test_llava_data_conventions_and_a_visible_count_of_skipped_records(workspace, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(LLAVA_STYLE_RECORDS + RECORDS[:1]))
    config = train_config(workspace, tmp_path / "out", data=str(data), image_folder=str(workspace.data.parent),
                          max_length=40, on_bad_record="skip", max_steps=1, curriculum="direct")  # fmt: skip
    run_training(config)
    printed = capsys.readouterr().out
    assert "checked 4, kept 3, skipped 1 (missing_image: 1 e.g. ['missing'])" in printed
    trainer, _ = trainer_module.build_trainer(config)  # the scan is reused from the output folder
    assert "reused" in trainer.data_notes[0]
    samples = {sample["id"]: sample for sample in (trainer.train_dataset[i] for i in range(3))}
    assert len(samples["overlong"]["input_ids"]) == 40
    expected = trainer.train_dataset.encoder.encode(
        data_module.record_to_conversation(
            {**LLAVA_STYLE_RECORDS[0], "conversations": RECORDS[0]["conversations"]}, 0
        ),
        Image.open(workspace.data.parent / "images" / "red_square.png").convert("RGB"),
    )
    assert torch.equal(samples["leading_answer"]["input_ids"], expected["input_ids"])
    assert torch.equal(samples["leading_answer"]["labels"], expected["labels"])


def test_an_adsc_checkpoint_keeps_its_schedule_and_keep_policy_without_a_budget(workspace, tmp_path):
    source = tmp_path / "adsc"
    convert_checkpoint(workspace.base, source, budget=10, pruning_layers=[1, 3])
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "adsc_keep_policy": "pyramiddrop"}))
    final_dir = run_training(
        train_config(workspace, tmp_path / "out", model=str(source), budget=None, max_steps=1, save_steps=100)
    )
    trained = AdscLlavaConfig.from_pretrained(final_dir)
    assert trained.schedule == {**AdscLlavaConfig.from_pretrained(source).schedule, "adsc_keep_policy": "pyramiddrop"}
    assert trained.adsc_pruning_layers == [1, 3] and trained.adsc_drop_ratio > 0
