"""Training on several processes (`accelerate launch --multi_gpu --num_processes 2` on CPUs, gloo), mixed precision.

The 2-process runs use a child script (`DDP_SCRIPT`) that calls `run_training` as `adsc-llava train` does, with two
test-only callbacks: one records, per rank, the record ids the rank was given and the drop ratio its model ran each
step with; the other, when asked, kills rank 0 right after a given checkpoint is complete (torchrun then stops the
other rank), as a crash would. The
data mixes image and text-only records, so some steps give one rank a batch without images: with DDP's search for
unused parameters switched off, such a step fails unless that rank still runs the vision tower and projector.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import IMAGE_SIZE, RECORDS, make_workspace

from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.sampler import ModalityLengthGroupedSampler
from adsc_llava.train.trainer import build_trainer, check_deepspeed_version, count_parameters

from conftest import run_fresh_process

MAX_STEPS, SAVE_STEPS, BATCH = 6, 2, 2
BUDGET = 8.0
TEXT_ONLY_RECORDS = [
    {
        "id": f"text_{index}",
        "conversations": [{"from": "human", "value": "what is a square ?"}, {"from": "gpt", "value": "a shape"}],
    }
    for index in range(2)
]
RUN_TIMEOUT_S = 420

DDP_SCRIPT = r"""
import json, os, signal, sys, time
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import TrainerCallback

from adsc_llava.train import dataset as dataset_module
from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.trainer import run_training

request = json.loads(Path(sys.argv[1]).read_text())
log_dir = Path(request["log_dir"])
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
record = {"world_size": int(os.environ["WORLD_SIZE"]), "ids": [], "drop_ratios": [], "layer_calls": []}
layer_calls = [0]

original_getitem = dataset_module.LlavaInstructDataset.__getitem__


def recording_getitem(self, index):
    item = original_getitem(self, index)
    record["ids"].append(item["id"])
    return item


dataset_module.LlavaInstructDataset.__getitem__ = recording_getitem


class Record(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # ZeRO-3 partitions each parameter as the model is built; DeepSpeed marks those with a `ds_id`.
        record["partitioned"] = all(hasattr(p, "ds_id") for p in model.parameters())
        # Forward calls of the first decoder layer's MLP: 2 a step when activation checkpointing recomputes the layer
        # (transformers checkpoints the layer's `forward`, inside its hooks, so count a module within).
        (mlp,) = [m for name, m in model.named_modules() if name.endswith("language_model.layers.0.mlp")]
        mlp.register_forward_pre_hook(lambda module, args: layer_calls.__setitem__(0, layer_calls[0] + 1))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        record["drop_ratios"].append(model.config.adsc_drop_ratio)
        record["layer_calls"].append(layer_calls[0])
        layer_calls[0] = 0
        Path(log_dir, f"rank{rank}.json").write_text(json.dumps(record))

    def on_train_end(self, args, state, control, **kwargs):
        record["losses"] = [entry["loss"] for entry in state.log_history if "loss" in entry]
        Path(log_dir, f"rank{rank}.json").write_text(json.dumps(record))


class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == request["kill_after_checkpoint"] and state.is_world_process_zero:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-run, as a crash would: torchrun then stops the other rank


def create_repo(self, repo_id, **kwargs):
    record["create_repo"] = {"repo_id": repo_id, "private": kwargs.get("private")}


def upload_folder(self, *, folder_path, repo_id, **kwargs):
    # A slow upload: it finishes only once the other process has returned from run_training (or after 60 s). A
    # process waiting for this one at a barrier would never return.
    deadline = time.monotonic() + 60
    while not (log_dir / "rank1-returned").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    record["upload"] = {
        "files": sorted(path.name for path in Path(folder_path).iterdir()),
        "process_group_alive": torch.distributed.is_initialized(),
        "other_process_returned": (log_dir / "rank1-returned").exists(),
    }


HfApi.create_repo, HfApi.upload_folder = create_repo, upload_folder
callbacks = [Record()] + ([KillAfterCheckpoint()] if request.get("kill_after_checkpoint") else [])
run_training(AdscTrainConfig(**request["config"]), callbacks=callbacks)
(log_dir / f"rank{rank}-returned").touch()
Path(log_dir, f"rank{rank}.json").write_text(json.dumps(record))
"""

LOAD_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForImageTextToText
workdir = Path(sys.argv[1])
request = json.loads((workdir / "request.json").read_text())
model = AutoModelForImageTextToText.from_pretrained(request["final"], trust_remote_code=True)
ids = torch.tensor([[1, 5, 6, 7]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
report = {"module": type(model).__module__, "drop_ratio": model.config.adsc_drop_ratio}
report["finite"] = bool(torch.isfinite(logits).all())
(workdir / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> SimpleNamespace:
    """A tiny stock LLaVA checkpoint and 6 records: 4 with an image, 2 text-only."""
    return make_workspace(tmp_path_factory.mktemp("distributed"), RECORDS + TEXT_ONLY_RECORDS)


def ddp_config(workspace, output_dir: Path, **overrides) -> dict:
    options = dict(
        model=str(workspace.base),
        data=str(workspace.data),
        output_dir=str(output_dir),
        budget=BUDGET,
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=BATCH,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        projector_learning_rate=3e-3,
        logging_steps=1,
        disable_tqdm=True,
        group_by_modality_length=True,
        dataloader_num_workers=0,
    )
    return {**options, **overrides}


def launch(workdir: Path, request: dict, expect_killed: bool = False) -> str:
    """`accelerate launch --multi_gpu --num_processes 2` of `DDP_SCRIPT` (two CPU processes, gloo); its stdout."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    request = {**request, "log_dir": str(workdir / "logs")}
    (workdir / "request.json").write_text(json.dumps(request))
    (workdir / "ddp_script.py").write_text(DDP_SCRIPT)
    # `--multi_gpu` is accelerate's torchrun launcher, which also starts CPU processes (gloo); with `--cpu` instead,
    # accelerate starts one process unless given an MPI hostfile, whatever `--num_processes` says.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    completed = subprocess.run(
        [*accelerate, str(workdir / "ddp_script.py"), str(workdir / "request.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    if expect_killed:
        assert completed.returncode != 0 and "Signal 9 (SIGKILL)" in completed.stderr, completed.stderr[-3000:]
    else:
        assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def rank_logs(workdir: Path) -> list[dict]:
    return [json.loads((workdir / "logs" / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def uninterrupted(workspace) -> SimpleNamespace:
    """The 2-process DDP run, with the defaults' activation checkpointing, pushed to a mocked hub at the end."""
    workdir = workspace.root / "uninterrupted"
    config = ddp_config(workspace, workdir / "out", push_to_hub=True, hub_model_id="me/tiny-adsc")
    launch(workdir, {"config": config})
    return SimpleNamespace(workdir=workdir, final=workdir / "out" / "final", logs=rank_logs(workdir))


def test_ranks_see_disjoint_samples_and_the_same_curriculum(uninterrupted):
    first, second = uninterrupted.logs
    assert first["world_size"] == second["world_size"] == 2
    assert len(first["ids"]) == len(second["ids"]) == MAX_STEPS * BATCH
    for step in range(MAX_STEPS):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        assert not set(first["ids"][batch]) & set(second["ids"][batch]), step
    # Each epoch (3 steps of 2 x 2 samples; the sampler pads the sixth record's partner) covers every record.
    epoch = slice(0, 3 * BATCH)
    all_ids = {record["id"] for record in RECORDS + TEXT_ONLY_RECORDS}
    assert set(first["ids"][epoch]) | set(second["ids"][epoch]) == all_ids
    # Some step gave one rank only text-only records while the other had images.
    mixed = [
        step
        for step in range(MAX_STEPS)
        if {rank["ids"][step * BATCH].startswith("text_") for rank in (first, second)} == {True, False}
        and all(
            all(i.startswith("text_") for i in rank["ids"][step * BATCH : (step + 1) * BATCH])
            or not any(i.startswith("text_") for i in rank["ids"][step * BATCH : (step + 1) * BATCH])
            for rank in (first, second)
        )
    ]
    assert mixed, "the data never gave a rank a batch without images"
    assert first["drop_ratios"] == second["drop_ratios"] and len(first["drop_ratios"]) == MAX_STEPS
    assert len(set(first["drop_ratios"])) == 3  # the reverse curriculum's three phases, on both ranks alike
    assert first["layer_calls"] == second["layer_calls"] == [2] * MAX_STEPS  # checkpointed: forward + recompute


def test_the_main_process_pushes_after_the_others_have_returned(uninterrupted):
    """The merge and the upload run on the main process after the process group is gone: no process waits at a
    barrier for them (a wait longer than --ddp-timeout would kill the job mid-upload). The repository is private."""
    first, second = uninterrupted.logs
    assert first["create_repo"] == {"repo_id": "me/tiny-adsc", "private": True}
    assert first["upload"]["process_group_alive"] is False and first["upload"]["other_process_returned"] is True
    assert {"config.json", "model.safetensors", "README.md"} <= set(first["upload"]["files"])
    assert "create_repo" not in second and "upload" not in second


def test_one_final_checkpoint_that_loads_in_a_fresh_process_and_differs_from_the_base(uninterrupted, workspace):
    out = uninterrupted.final.parent
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith("checkpoint-")) == [
        "data-scan.json",
        "final",
    ]
    assert (uninterrupted.final / "README.md").read_text().count("# ") >= 1
    final = load_file(uninterrupted.final / "model.safetensors")
    base = load_file(workspace.base / "model.safetensors")
    projector = "multi_modal_projector.linear_1.weight"  # saved in the llava-hf layout
    assert not torch.equal(final[projector], base[projector])
    layer = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final[layer], base[layer])  # LoRA merged in
    report = run_fresh_process(LOAD_SCRIPT, uninterrupted.workdir, {"final": str(uninterrupted.final)})
    assert report["module"].startswith("transformers_modules.") and report["finite"]
    assert report["drop_ratio"] == json.loads((uninterrupted.final / "config.json").read_text())["adsc_drop_ratio"]


def test_killed_run_resumes_to_the_same_weights(uninterrupted, workspace):
    workdir = workspace.root / "killed"
    config = ddp_config(workspace, workdir / "out")
    launch(workdir, {"config": config, "kill_after_checkpoint": 2}, expect_killed=True)
    out = workdir / "out"
    assert (out / "checkpoint-2").is_dir() and not (out / "final").exists()
    shutil.rmtree(workdir / "logs")
    printed = launch(workdir, {"config": {**config, "resume": True}})
    assert f"(reused {out / 'data-scan.json'})" in printed  # the killed run's data scan, not a second one
    resumed = load_file(out / "final" / "model.safetensors")
    expected = load_file(uninterrupted.final / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    # The resumed ranks trained steps 3-6 only, in the curriculum's later phases.
    resumed_logs = rank_logs(workdir)
    assert resumed_logs[0]["drop_ratios"] == uninterrupted.logs[0]["drop_ratios"][2:]


def test_trainable_weights_are_fp32_over_bf16_frozen_ones_and_the_projector_learns(workspace, tmp_path):
    """bf16 training: LoRA and the projector copy keep fp32 weights, so one step at the default 2e-5 moves them."""
    options = dict(max_steps=1, bf16=True, curriculum="direct", warmup_ratio=0.0, lr_scheduler_type="constant")
    config = AdscTrainConfig(**ddp_config(workspace, tmp_path / "out", **options))
    config.projector_learning_rate = AdscTrainConfig.__dataclass_fields__["projector_learning_rate"].default
    trainer, _ = build_trainer(config)
    dtypes = {name: parameter.dtype for name, parameter in trainer.model.named_parameters()}
    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert trainable and all(dtypes[name] == torch.float32 for name in trainable)
    assert any("lora_A" in name for name in trainable) and any("modules_to_save" in name for name in trainable)
    frozen = [dtype for name, dtype in dtypes.items() if name not in trainable]
    assert frozen and all(dtype == torch.bfloat16 for dtype in frozen)
    projector = "multi_modal_projector.modules_to_save.default.linear_1.weight"
    (name,) = [name for name in trainable if name.endswith(projector)]
    before = dict(trainer.model.named_parameters())[name].detach().clone()
    trainer.train()
    after = dict(trainer.model.named_parameters())[name].detach()
    assert (after != before).float().mean() > 0.99  # in bf16 most of them would not move at this learning rate


def assert_the_blank_row_changes_no_loss_and_trains_the_projector(trainer, text_only: dict) -> None:
    model = trainer.model
    loss = trainer.compute_loss(model, text_only)
    with torch.no_grad():
        assert torch.allclose(loss, model(**text_only).loss, atol=1e-5)  # the blank row changes nothing
    loss.backward()
    gradients = [p.grad for n, p in model.named_parameters() if "multi_modal_projector.modules_to_save" in n]
    assert gradients and all(grad is not None for grad in gradients)


def test_a_batch_without_images_still_runs_the_vision_tower(workspace, tmp_path):
    """A text-only batch gains a masked blank-image row: the projector gets a gradient, the loss is the real rows'."""
    trainer, _ = build_trainer(AdscTrainConfig(**ddp_config(workspace, tmp_path / "out", scan_data=False)))
    text_only = trainer.data_collator([trainer.train_dataset[4], trainer.train_dataset[5]])
    assert "pixel_values" not in text_only
    with_row = trainer.blank_image_row(text_only)
    image_token_id = trainer.model.config.image_token_id
    assert with_row["input_ids"].shape[0] == 3 and int((with_row["input_ids"][2] == image_token_id).sum()) == 16
    assert with_row["attention_mask"][2].sum() == 16 and (with_row["labels"][2] == -100).all()
    assert with_row["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert_the_blank_row_changes_no_loss_and_trains_the_projector(trainer, text_only)


@pytest.mark.parametrize(
    "image_records_only, option, grouped",
    [(False, None, True), (False, False, False), (True, None, False), (True, True, True)],
)
def test_llavas_sampler_is_the_default_for_data_that_mixes_image_and_text_records(
    workspace, tmp_path, image_records_only, option, grouped
):
    """LLaVA's recipe groups its mixed 665K by modality: the default does so for mixed data, an option overrides."""
    data = workspace.data
    if image_records_only:
        data = tmp_path / "images.json"
        data.write_text(json.dumps(RECORDS))
    overrides = dict(data=str(data), image_folder=str(workspace.data.parent), group_by_modality_length=option)
    config = ddp_config(workspace, tmp_path / "out", scan_data=False, **overrides)
    trainer, _ = build_trainer(AdscTrainConfig(**config))
    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler) == grouped


def test_the_seed_fixes_the_initial_adapter(workspace, tmp_path):
    """LoRA weights are drawn before the Trainer seeds itself: `--seed` must cover them (ranks, reruns, resumes)."""

    def initial_adapter(seed: int) -> dict:
        config = AdscTrainConfig(**ddp_config(workspace, tmp_path / f"out{seed}", scan_data=False, seed=seed))
        trainer, _ = build_trainer(config)
        return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_A" in name}

    torch.manual_seed(123)  # whatever the global RNG holds before
    first = initial_adapter(seed=7)
    torch.manual_seed(456)
    again, other = initial_adapter(seed=7), initial_adapter(seed=8)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


deepspeed_installed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
)


@deepspeed_installed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_two_cpu_processes_and_saves_the_full_model(stage, uninterrupted, workspace):
    """ZeRO-2 / ZeRO-3 from the shipped configs, on DeepSpeed's CPU accelerator: the loss falls, the merged model is
    written once, whole (gathered from both ranks under ZeRO-3), loads in a fresh process and differs from the base.
    """
    workdir = workspace.root / f"zero{stage}"
    config = ddp_config(workspace, workdir / "out", deepspeed=f"zero{stage}")  # the shipped config, by name
    printed = launch(workdir, {"config": config})
    first, second = rank_logs(workdir)
    assert first["partitioned"] == second["partitioned"] == (stage == 3)  # ZeRO-3: partitioned while loading
    # Activation checkpointing is on (the default) and works under ZeRO-3 with LoRA's frozen weights.
    assert first["layer_calls"] == second["layer_calls"] == [2] * MAX_STEPS
    # The start-of-run summary counts ZeRO-3's partitioned weights whole (`ds_numel`), as one process holds them all.
    trainer, _ = build_trainer(AdscTrainConfig(**ddp_config(workspace, workdir / "count", scan_data=False)))
    trainable, total = count_parameters(trainer.model)
    assert f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)" in printed
    assert first["drop_ratios"] == second["drop_ratios"] == uninterrupted.logs[0]["drop_ratios"]
    losses = [float(loss) for loss in first["losses"]]
    assert len(losses) == MAX_STEPS and losses[-1] < losses[0]
    ddp_losses = [float(loss) for loss in uninterrupted.logs[0]["losses"]]
    assert losses[0] == pytest.approx(ddp_losses[0], rel=1e-4)  # the same model, data and first batch as DDP
    if stage == 2:  # same full weights on every rank: the same run as plain DDP, step for step
        assert losses == pytest.approx(ddp_losses, rel=1e-3)
    final = workdir / "out" / "final"
    weights = load_file(final / "model.safetensors")
    base = load_file(workspace.base / "model.safetensors")
    assert weights.keys() == base.keys() and all(weights[k].shape == base[k].shape for k in base)  # whole tensors
    assert not torch.equal(
        weights["multi_modal_projector.linear_1.weight"], base["multi_modal_projector.linear_1.weight"]
    )
    assert sorted(path.name for path in (workdir / "out").iterdir() if not path.name.startswith("checkpoint-")) == [
        "data-scan.json",
        "final",
    ]
    report = run_fresh_process(LOAD_SCRIPT, workdir, {"final": str(final)})
    assert report["module"].startswith("transformers_modules.") and report["finite"]


def test_parameter_counts_take_zero3_partitioned_weights_whole():
    """Under ZeRO-3 a process holds an empty shell of each partitioned weight (`numel() == 0`) and its real size in
    `ds_numel`: counting shells made `--tune full` divide by zero and LoRA report 100% trainable."""
    model = torch.nn.Linear(4, 3)
    for parameter, full_size in ((model.weight, 12), (model.bias, 3)):
        parameter.data = torch.empty(0)
        parameter.ds_numel = full_size
    model.bias.requires_grad_(False)
    assert count_parameters(model) == (12, 15)


@pytest.mark.parametrize(
    "lora, zero3, checkpointing, version, refused",
    [
        (True, True, True, "0.19.2", True),  # before deepspeedai/DeepSpeed#8148: the first backward fails
        (True, True, True, "0.19.3", False),
        (True, True, False, "0.19.2", False),  # no recomputation
        (True, False, True, "0.19.2", False),  # ZeRO-2 / DDP partition no weights
        (False, True, True, "0.19.2", False),  # full tuning freezes nothing
        (True, True, True, None, False),  # no DeepSpeed at all
    ],
)
def test_lora_under_zero3_with_checkpointing_needs_deepspeed_0_19_3(lora, zero3, checkpointing, version, refused):
    check = dict(lora=lora, zero3=zero3, checkpointing=checkpointing, deepspeed_version=version)
    if not refused:
        check_deepspeed_version(**check)
        return
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0.19.2 cannot .* pip install 'deepspeed>=0.19.3'"):
        check_deepspeed_version(**check)


# --------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT and OneVision: a batch without images gets a blank image of the family's own grid
# --------------------------------------------------------------------------------------------------------------


def next_workspace(root: Path, family: str, records: list[dict]) -> SimpleNamespace:
    """A tiny stock NeXT / OneVision checkpoint with its processor (`processor_and_stock_config`), and `records` with
    their image."""
    from test_next_onevision import FAMILIES, processor_and_stock_config

    processor, config = processor_and_stock_config(family, ("what", "is", "it", "?", "red", "blue"))
    stock_class = FAMILIES[family][3]
    torch.manual_seed(0)
    stock_class(config).save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 20), "red").save(root / "images" / "red.png")
    (root / "data.json").write_text(json.dumps(records))
    return SimpleNamespace(root=root, base=root / "base", data=root / "data.json", processor=processor)


NEXT_RECORDS = [
    {
        "id": "image_0",
        "image": "images/red.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "red"}],
    },
    {"id": "text_0", "conversations": [{"from": "human", "value": "what is it ?"}, {"from": "gpt", "value": "blue"}]},
]


def next_config(workspace: SimpleNamespace, output_dir: Path, **overrides) -> dict:
    # Budget 1200 of the reference image's 2,340 (NeXT) or 2,929 (OneVision) tokens; one phase for two steps.
    options = dict(model=str(workspace.base), data=str(workspace.data), budget=1200.0, curriculum="direct")
    return ddp_config(workspace, output_dir, **{**options, "max_steps": 2, "per_device_train_batch_size": 1,
                                                 "save_steps": 100, **overrides})  # fmt: skip


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_a_next_or_onevision_batch_without_images_gets_the_familys_blank_image(family, tmp_path):
    workspace = next_workspace(tmp_path, family, NEXT_RECORDS)
    trainer, _ = build_trainer(AdscTrainConfig(**next_config(workspace, tmp_path / "out", scan_data=False)))
    text_only = trainer.data_collator([trainer.train_dataset[1]])
    with_row = trainer.blank_image_row(text_only)
    blank = Image.new("RGB", (16, 16))  # the vision tower's image size
    expected = workspace.processor(images=[blank], text=["<image>"], return_tensors="pt")
    image_token_id = trainer.model.config.image_token_id
    span = int((expected["input_ids"] == image_token_id).sum())
    assert (
        int((with_row["input_ids"][1] == image_token_id).sum()) == span and with_row["attention_mask"][1].sum() == span
    )
    assert torch.equal(with_row["pixel_values"], expected["pixel_values"])
    assert torch.equal(with_row["image_sizes"], expected["image_sizes"])
    assert_the_blank_row_changes_no_loss_and_trains_the_projector(trainer, text_only)


def test_llava_next_trains_on_two_processes_when_one_gets_no_image(tmp_path):
    """Each step gives one process the image record and the other the text-only one."""
    workspace = next_workspace(tmp_path, "next", NEXT_RECORDS)
    launch(tmp_path / "run", {"config": next_config(workspace, tmp_path / "run" / "out")})
    first, second = rank_logs(tmp_path / "run")
    for step in range(2):
        assert {first["ids"][step], second["ids"][step]} == {"image_0", "text_0"}
    assert (tmp_path / "run" / "out" / "final" / "model.safetensors").is_file()
