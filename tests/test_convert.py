"""`python -m train.convert`: stock llava-hf checkpoint folders (both key layouts) -> ADSC-LLaVA checkpoint folders."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoProcessor, LlamaConfig, LlavaForConditionalGeneration

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.configuration_adsc_llava import solve_drop_ratio
from adsc_llava.convert import CorruptCheckpointError, convert_checkpoint, main
from adsc_llava.testing import build_tiny_processor, tiny_llava_config_for

SHIPPED_FILES = ("configuration_adsc_llava.py", "modeling_adsc_llava.py")
PROMPT = "USER: <image>\nwhat color is the square ? ASSISTANT: red"
# Current names (`LlavaForConditionalGeneration.state_dict()`) -> the older llava-hf layout, first match wins.
OLD_LAYOUT_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def to_old_layout(key: str) -> str:
    for new, old in OLD_LAYOUT_PREFIXES:
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(f"no old-layout name for {key}")


def write_checkpoint(folder: Path, stock: LlavaForConditionalGeneration, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder written by hand: config.json + model.safetensors holding exactly `tensors`."""
    folder.mkdir(parents=True)
    stock.config.save_pretrained(folder)
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """A tiny random stock LLaVA, its processor and its checkpoint folders in three key layouts."""
    root = tmp_path_factory.mktemp("stock")
    processor = build_tiny_processor()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config_for(processor)).eval()
    state_dict = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    model.save_pretrained(root / "saved")  # whatever layout this transformers version writes
    processor.save_pretrained(root / "saved")
    folders = {
        "saved": root / "saved",
        "current-layout": write_checkpoint(root / "current", model, state_dict),
        "old-layout": write_checkpoint(root / "old", model, {to_old_layout(k): v for k, v in state_dict.items()}),
    }
    image = Image.new("RGB", (32, 32), "white")
    image.paste((200, 30, 30), (8, 8, 24, 24))
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return dict(model=model, processor=processor, folders=folders, state_dict=state_dict, inputs=inputs, logits=logits)


def load_converted(folder: Path) -> AdscLlavaForConditionalGeneration:
    model, loading_info = AdscLlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert loading_info["missing_keys"] == set() and loading_info["unexpected_keys"] == set()
    assert loading_info["mismatched_keys"] == set() and loading_info["error_msgs"] == []
    return model.eval()


@pytest.mark.parametrize("layout", ["saved", "current-layout", "old-layout"])
def test_converted_checkpoint_holds_every_weight_and_predicts_like_stock(stock, tmp_path, layout):
    config = convert_checkpoint(stock["folders"][layout], tmp_path / "adsc")
    assert config.adsc_pruning_layers == [] and config.adsc_drop_ratio == 0.0
    model = load_converted(tmp_path / "adsc")
    converted_state = model.state_dict()
    assert converted_state.keys() == stock["state_dict"].keys()
    assert all(torch.equal(converted_state[key], tensor) for key, tensor in stock["state_dict"].items())
    with torch.no_grad():
        logits = model(**stock["inputs"]).logits
    assert torch.equal(logits, stock["logits"])
    for name in SHIPPED_FILES:
        assert (tmp_path / "adsc" / name).read_bytes() == (Path(__file__).parents[1] / name).read_bytes()
    saved_config = json.loads((tmp_path / "adsc" / "config.json").read_text())
    assert saved_config["model_type"] == "adsc_llava"
    assert saved_config["auto_map"]["AutoModelForImageTextToText"].endswith("AdscLlavaForConditionalGeneration")
    assert sorted(path.name for path in (tmp_path / "adsc").glob("*.safetensors")) == ["model.safetensors"]


def test_budget_from_the_command_line_solves_drop_ratio(stock, tmp_path, capsys):
    budget = 8  # of 16 vision tokens per image, 4 LLM layers
    assert main([str(stock["folders"]["old-layout"]), str(tmp_path / "adsc"), "--budget", str(budget)]) == 0
    config = AdscLlavaConfig.from_pretrained(tmp_path / "adsc")
    num_layers = config.text_config.num_hidden_layers
    assert config.adsc_pruning_layers == [1, 2, 3]  # the paper's [2, 8, 16, 24] of 32 layers, scaled to 4
    assert config.adsc_drop_ratio == solve_drop_ratio(num_layers, [1, 2, 3], config.image_seq_length, budget)
    assert 0 < config.adsc_drop_ratio < 1 and config.average_vision_tokens() <= budget
    saved = json.loads((tmp_path / "adsc" / "config.json").read_text())
    assert (saved["adsc_pruning_layers"], saved["adsc_drop_ratio"]) == ([1, 2, 3], config.adsc_drop_ratio)
    printed = capsys.readouterr().out
    assert str(config.vision_tokens_per_layer()) in printed
    assert f"{config.average_vision_tokens():.2f}" in printed and f"{config.adsc_drop_ratio:g}" in printed
    # The pruned model loads with every weight and really prunes.
    model = load_converted(tmp_path / "adsc")
    with torch.no_grad():
        assert not torch.equal(model(**stock["inputs"]).logits, stock["logits"])


def test_drop_ratio_and_pruning_layers_from_the_command_line(stock, tmp_path):
    args = [str(stock["folders"]["saved"]), str(tmp_path / "adsc"), "--drop-ratio", "0.5", "--pruning-layers", "2"]
    assert main(args) == 0
    config = AdscLlavaConfig.from_pretrained(tmp_path / "adsc")
    assert (config.adsc_pruning_layers, config.adsc_drop_ratio) == ([2], 0.5)
    assert config.vision_tokens_per_layer() == [16, 16, 8, 8]


def test_an_adsc_source_keeps_its_layers_and_keep_policy_unless_told_otherwise(stock, tmp_path):
    source = tmp_path / "source"
    schedule = ["--drop-ratio", "0.5", "--pruning-layers", "1", "3"]
    assert main([str(stock["folders"]["saved"]), str(source), *schedule]) == 0
    saved = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**saved, "adsc_keep_policy": "pyramiddrop"}))
    assert main([str(source), str(tmp_path / "same")]) == 0  # nothing asked: the whole schedule stays
    same = AdscLlavaConfig.from_pretrained(tmp_path / "same")
    assert same.schedule == {"adsc_pruning_layers": [1, 3], "adsc_drop_ratio": 0.5, "adsc_keep_policy": "pyramiddrop"}
    assert main([str(source), str(tmp_path / "budget"), "--budget", "10"]) == 0  # a new budget on the same layers
    budget = AdscLlavaConfig.from_pretrained(tmp_path / "budget")
    assert (budget.adsc_pruning_layers, budget.adsc_keep_policy) == ([1, 3], "pyramiddrop")
    assert budget.adsc_drop_ratio == solve_drop_ratio(4, [1, 3], budget.image_seq_length, 10)
    assert main([str(source), str(tmp_path / "layers"), "--drop-ratio", "0.25", "--pruning-layers", "2"]) == 0
    layers = AdscLlavaConfig.from_pretrained(tmp_path / "layers")
    assert layers.schedule == {"adsc_pruning_layers": [2], "adsc_drop_ratio": 0.25, "adsc_keep_policy": "pyramiddrop"}


def test_processor_is_carried_over(stock, tmp_path):
    convert_checkpoint(stock["folders"]["saved"], tmp_path / "adsc", drop_ratio=0.5)
    processor = AutoProcessor.from_pretrained(tmp_path / "adsc", trust_remote_code=True)
    image = Image.new("RGB", (40, 36), "blue")
    ours = processor(images=image, text=PROMPT, return_tensors="pt")
    theirs = stock["processor"](images=image, text=PROMPT, return_tensors="pt")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert processor.chat_template == stock["processor"].chat_template


def test_source_without_processor_converts_with_a_note(stock, tmp_path, capsys):
    convert_checkpoint(stock["folders"]["old-layout"], tmp_path / "adsc")
    assert "no processor files" in capsys.readouterr().out
    assert not (tmp_path / "adsc" / "tokenizer.json").exists()


def test_source_dtype_is_kept(stock, tmp_path):
    half = LlavaForConditionalGeneration(stock["model"].config).to(torch.bfloat16)
    half.load_state_dict({key: tensor.to(torch.bfloat16) for key, tensor in stock["state_dict"].items()})
    half.save_pretrained(tmp_path / "bf16")
    config = convert_checkpoint(tmp_path / "bf16", tmp_path / "adsc", drop_ratio=0.5)
    assert json.loads((tmp_path / "adsc" / "config.json").read_text())["dtype"] == "bfloat16"
    assert str(config.dtype).removeprefix("torch.") == "bfloat16"
    with safe_open(tmp_path / "adsc" / "model.safetensors", framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.bfloat16}


def test_refuses_a_non_empty_destination_unless_overwrite(stock, tmp_path, capsys):
    destination = tmp_path / "adsc"
    destination.mkdir()
    (destination / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint(stock["folders"]["saved"], destination)
    with pytest.raises(SystemExit) as exit_info:
        main([str(stock["folders"]["saved"]), str(destination)])
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert sorted(path.name for path in destination.iterdir()) == ["notes.txt"]
    main([str(stock["folders"]["saved"]), str(destination), "--overwrite"])
    assert (destination / "model.safetensors").is_file() and (destination / "notes.txt").is_file()


@pytest.mark.parametrize(
    "corruption, expected_words",
    [
        ("missing", ["missing tensors", "model.language_model.layers.1.mlp.up_proj.weight"]),
        ("wrong-shape", ["wrong shape", "model.language_model.layers.1.mlp.up_proj.weight", "(3, 5)", "(128, 64)"]),
        ("unexpected", ["unexpected tensors", "extra_adapter.weight"]),
    ],
)
def test_corrupt_checkpoint_is_a_clear_error_and_writes_nothing(stock, tmp_path, corruption, expected_words):
    tensors = {to_old_layout(key): tensor for key, tensor in stock["state_dict"].items()}
    victim = to_old_layout("model.language_model.layers.1.mlp.up_proj.weight")
    if corruption == "missing":
        del tensors[victim]
    elif corruption == "wrong-shape":
        tensors[victim] = torch.zeros(3, 5)
    else:
        tensors["language_model.model.extra_adapter.weight"] = torch.zeros(2, 2)
    source = write_checkpoint(tmp_path / "corrupt", stock["model"], tensors)
    with pytest.raises(CorruptCheckpointError, match="Corrupt checkpoint") as error:
        convert_checkpoint(source, tmp_path / "adsc")
    for words in expected_words:
        assert words in str(error.value)
    assert not (tmp_path / "adsc").exists() or not any((tmp_path / "adsc").iterdir())


def test_bad_sources_and_schedules_are_clear_errors(stock, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "adsc")
    LlamaConfig(num_hidden_layers=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        convert_checkpoint(tmp_path / "llama", tmp_path / "adsc")
    source = stock["folders"]["saved"]
    with pytest.raises(ValueError, match="DST must differ from SRC"):
        convert_checkpoint(source, source, overwrite=True)
    # 16 vision tokens, 4 layers, first pruning layer 1: at least 16 * 1 / 4 = 4 tokens on average.
    with pytest.raises(SystemExit):
        main([str(source), str(tmp_path / "adsc"), "--budget", "2"])
    assert "reachable range is [4, 16]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(source), str(tmp_path / "adsc"), "--pruning-layers", "2"])
    assert "--pruning-layers needs --budget or --drop-ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(source), str(tmp_path / "adsc"), "--budget", "8", "--drop-ratio", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "adsc").exists()
