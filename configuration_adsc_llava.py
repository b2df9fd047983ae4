"""Configuration of ADSC-LLaVA: a LLaVA model that drops vision tokens inside its language model.

This file is shipped inside every ADSC checkpoint (remote code), so it imports only `torch`-free standard modules
and `transformers`.

The pruning schedule:

- `adsc_pruning_layers`: 0-based indices of the decoder layers at whose *input* vision tokens are downsampled;
- `adsc_drop_ratio` (`r`): at each of those layers every image keeps `floor((1 - r) * n)` of its `n` alive tokens;
- `adsc_keep_policy`: which ones. ADSC's "uniform" (fixed, evenly spaced positions) or, as baselines with the same
  counts, "fastv" and "pyramiddrop" (the most attended tokens; see `KEEP_POLICIES`).

The paper's "budget" is the mean, over all decoder layers, of the vision tokens (per image) that each layer sees.
"""

import math
import re

import transformers
from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

# The oldest transformers the modeling files run on (5.24 renamed `past_key_values` to `cache` in the model forwards
# they call). The configs themselves load on older releases too (serving engines such as vLLM read them with their own
# model code); each modeling file calls `check_transformers_version` before importing anything else from transformers.
MIN_TRANSFORMERS_VERSION = "5.24.0"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)\.?(\d*)", version).groups() if part)


def check_transformers_version() -> None:
    """Raise a clear `ImportError` when the installed transformers is older than the modeling files need."""
    if _release(transformers.__version__) < _release(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"ADSC-LLaVA's remote code needs transformers >= {MIN_TRANSFORMERS_VERSION}, but transformers "
            f"{transformers.__version__} is installed: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )


# The paper's pruning layers for a 32-layer LLM (LLaVA-1.5-7B); other depths scale them proportionally.
PAPER_PRUNING_LAYERS = (2, 8, 16, 24)
PAPER_NUM_LAYERS = 32

# Written into every config.json so that `trust_remote_code=True` finds the classes in the checkpoint's own copies of
# the two modeling files. AutoModel maps to the generation class too, not to the bare `AdscLlavaModel`: lmms-eval's
# generic model loader falls back to AutoModel and then calls `generate()`.
# Keys of a saved config that name the class rather than describe the model; a config of another class drops them.
REMOTE_CODE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")

ADSC_AUTO_MAP = {
    "AutoConfig": "configuration_adsc_llava.AdscLlavaConfig",
    "AutoModel": "modeling_adsc_llava.AdscLlavaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_adsc_llava.AdscLlavaForConditionalGeneration",
}


# How each policy picks the `floor((1 - r) * n)` vision tokens an image keeps at a pruning layer `l`:
# - "uniform" (ADSC): the centres of equal bins, `uniform_keep_positions(n, k)`; no attention scores;
# - "fastv": the top k by the attention they receive from the prompt's last token in layer `l - 1` (FastV);
# - "pyramiddrop": the top k by the attention the prompt's last token would give them in layer `l` (PyramidDrop).
# Scores are softmax probabilities over the forward's tokens, averaged over heads; ties keep the earlier token.
KEEP_POLICIES = ("uniform", "fastv", "pyramiddrop")
# Each policy's own pruning layers in a 32-layer LLM (ADSC's paper; FastV's K = 2; PyramidDrop's stages), for
# `default_pruning_layers` to scale to other depths.
POLICY_LAYERS_OF_32 = {"uniform": (2, 8, 16, 24), "fastv": (2,), "pyramiddrop": (8, 16, 24)}


def uniform_keep_positions(num_tokens: int, num_keep: int) -> list[int]:
    """Which of `num_tokens` tokens survive when `num_keep` are kept: the centres of `num_keep` equal bins.

    ADSC's rule, written once: the modeling files plan every stage with it (`num_kept_tokens` gives `num_keep`), and
    serving engines import it from here.

    Token `floor((2i + 1) * num_tokens / (2 * num_keep))` is kept for `i = 0 .. num_keep - 1`. The result is
    deterministic, strictly increasing, depends only on the two counts, and its gaps differ by at most one (it is
    a floor of an arithmetic progression with step `num_tokens / num_keep >= 1`). `num_keep = num_tokens` keeps
    everything, `num_keep = 0` keeps nothing.
    """
    if not 0 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must be in [0, num_tokens={num_tokens}], got {num_keep}.")
    return [(2 * i + 1) * num_tokens // (2 * num_keep) for i in range(num_keep)]


def num_kept_tokens(num_tokens: int, drop_ratio: float) -> int:
    """Vision tokens an image keeps at one pruning layer: `floor((1 - r) * n)`."""
    return math.floor((1.0 - drop_ratio) * num_tokens)


def vision_tokens_per_layer(
    num_layers: int, pruning_layers: list[int], drop_ratio: float, num_vision_tokens: int
) -> list[int]:
    """Vision tokens (per image) that each of the `num_layers` decoder layers sees under a schedule."""
    pruning_set = set(pruning_layers)
    tokens_per_layer, alive = [], num_vision_tokens
    for layer_idx in range(num_layers):
        if layer_idx in pruning_set:
            alive = num_kept_tokens(alive, drop_ratio)
        tokens_per_layer.append(alive)
    return tokens_per_layer


def average_vision_tokens(
    num_layers: int, pruning_layers: list[int], drop_ratio: float, num_vision_tokens: int
) -> float:
    """The paper's budget: mean over all decoder layers of the vision tokens (per image) each layer sees."""
    return sum(vision_tokens_per_layer(num_layers, pruning_layers, drop_ratio, num_vision_tokens)) / num_layers


def default_pruning_layers(num_layers: int, layers_of_32: tuple[int, ...] = PAPER_PRUNING_LAYERS) -> list[int]:
    """The paper's layers `[2, 8, 16, 24]` (or other layers of a 32-layer LLM) scaled to `num_layers`, kept strictly
    increasing in `[1, L)`."""
    layers: list[int] = []
    for paper_layer in layers_of_32:
        layer = min(max(round(paper_layer * num_layers / PAPER_NUM_LAYERS), 1), num_layers - 1)
        if layer >= 1 and (not layers or layer > layers[-1]):
            layers.append(layer)
    return layers


def policy_pruning_layers(policy: str, num_layers: int) -> list[int]:
    """A keep policy's own pruning layers (`POLICY_LAYERS_OF_32`) scaled to `num_layers`."""
    return default_pruning_layers(num_layers, POLICY_LAYERS_OF_32[policy])


def reachable_budget_range(num_layers: int, pruning_layers: list[int], num_vision_tokens: int) -> tuple[float, float]:
    """(smallest, largest) average budget a schedule with these layers can reach for some `r` in `[0, 1)`.

    The smallest drops every vision token at the first pruning layer, so only the layers before it see any.
    """
    if not pruning_layers:
        return float(num_vision_tokens), float(num_vision_tokens)
    return num_vision_tokens * pruning_layers[0] / num_layers, float(num_vision_tokens)


def solve_drop_ratio(num_layers: int, pruning_layers: list[int], num_vision_tokens: int, budget: float) -> float:
    """The smallest drop ratio `r` whose average budget does not exceed `budget`.

    The average budget is a non-increasing step function of `r`, so the answer is found by bisection and then
    rounded *up* to the fewest decimals (at least 4) that keep the same tokens per layer: e.g. budgets 192 / 128 /
    64 of 576 tokens on 32 layers pruned at `[2, 8, 16, 24]` give r = 0.4180 / 0.5608 / 0.8004.

    Raises:
        ValueError: if `budget` is outside the range these layers can reach.
    """
    low, high = reachable_budget_range(num_layers, pruning_layers, num_vision_tokens)
    if not low <= budget <= high:
        raise ValueError(
            f"Budget {budget} vision tokens is unreachable with pruning layers {pruning_layers} on {num_layers} "
            f"layers and {num_vision_tokens} vision tokens: the reachable range is [{low:g}, {high:g}] "
            "(an earlier first pruning layer reaches smaller budgets)."
        )

    def average(ratio: float) -> float:
        return average_vision_tokens(num_layers, pruning_layers, ratio, num_vision_tokens)

    if average(0.0) <= budget:
        return 0.0
    # Invariant: average(lo) > budget >= average(hi). The largest r below 1 in float is 1 - 2**-53.
    lo, hi = 0.0, 1.0 - 2.0**-53
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if average(mid) <= budget:
            hi = mid
        else:
            lo = mid
    schedule = vision_tokens_per_layer(num_layers, pruning_layers, hi, num_vision_tokens)
    for decimals in range(4, 16):
        rounded = math.ceil(hi * 10**decimals) / 10**decimals
        if (
            rounded < 1.0
            and vision_tokens_per_layer(num_layers, pruning_layers, rounded, num_vision_tokens) == schedule
        ):
            return rounded
    return hi


def validate_schedule(
    num_layers: int, pruning_layers: list[int], drop_ratio: float, keep_policy: str = "uniform"
) -> None:
    """Raise a `ValueError` naming the bad value and its limit if the schedule is not well formed."""
    if keep_policy not in KEEP_POLICIES:
        raise ValueError(f"adsc_keep_policy must be one of {KEEP_POLICIES}, got {keep_policy!r}.")
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"adsc_drop_ratio must be in [0, 1), got {drop_ratio}.")
    for layer in pruning_layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"adsc_pruning_layers must hold integers, got {layer!r} in {pruning_layers}.")
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"adsc_pruning_layers entry {layer} is out of range: each must be in [1, {num_layers}) "
                f"(num_hidden_layers={num_layers}; layer 0 always sees every token)."
            )
    for previous, current in zip(pruning_layers, pruning_layers[1:], strict=False):
        if current <= previous:
            raise ValueError(f"adsc_pruning_layers must be strictly increasing, got {pruning_layers}.")


class AdscScheduleMixin:
    """The ADSC schedule on a stock LLaVA-family config: validation, tokens per layer, budgets, the stock config back.

    A config class mixes it in before its stock class and declares the two schedule fields (`@strict` dataclasses
    take fields from the class itself); `STOCK_CONFIG_CLASS` names the stock class and `ADSC_AUTO_MAP` the remote-code
    classes written into `config.json`.
    """

    STOCK_CONFIG_CLASS: type = LlavaConfig
    AUTO_MAP: dict = {}

    def __post_init__(self, **kwargs):
        if self.adsc_pruning_layers is None:
            self.adsc_pruning_layers = []
        self.adsc_pruning_layers = list(self.adsc_pruning_layers)
        self.adsc_drop_ratio = float(self.adsc_drop_ratio)
        super().__post_init__(**kwargs)
        # Entries already present (e.g. `repo--module.Class` refs of a config loaded from the hub) win.
        self.auto_map = {**self.AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        # Checked here rather than in a `@strict` validator so that users get the plain `ValueError` they catch.
        validate_schedule(
            self.text_config.num_hidden_layers, self.adsc_pruning_layers, self.adsc_drop_ratio, self.adsc_keep_policy
        )

    @property
    def reference_vision_tokens(self) -> int:
        """The vision tokens of one image that budgets and `vision_tokens_per_layer()` refer to by default: the
        config's `adsc_reference_tokens` where the family has one (image sizes vary), else `image_seq_length`."""
        return getattr(self, "adsc_reference_tokens", None) or self.image_seq_length

    def vision_tokens_per_layer(self, num_vision_tokens: int | None = None) -> list[int]:
        """Vision tokens of one image (default: `reference_vision_tokens`) seen by each decoder layer."""
        num_vision_tokens = self.reference_vision_tokens if num_vision_tokens is None else num_vision_tokens
        return vision_tokens_per_layer(
            self.text_config.num_hidden_layers, self.adsc_pruning_layers, self.adsc_drop_ratio, num_vision_tokens
        )

    def surviving_vision_offsets(self, num_vision_tokens: int | None = None) -> list[list[int]]:
        """ADSC's rule for one image of `num_vision_tokens` (default `reference_vision_tokens`): for each pruning
        layer, the offsets (within the image's placeholder tokens) of the tokens alive from that layer on.

        Counts alone decide them (`uniform_keep_positions`), which is what lets an engine plan every stage before the
        forward runs. The score-based baseline policies have no such answer.
        """
        if self.adsc_keep_policy != "uniform":
            raise ValueError(f"keep policy {self.adsc_keep_policy!r} picks tokens by attention scores, not by counts.")
        num_tokens = self.reference_vision_tokens if num_vision_tokens is None else num_vision_tokens
        alive, surviving = list(range(num_tokens)), []
        for _ in self.adsc_pruning_layers:
            kept = uniform_keep_positions(len(alive), num_kept_tokens(len(alive), self.adsc_drop_ratio))
            alive = [alive[i] for i in kept]
            surviving.append(alive)
        return surviving

    def average_vision_tokens(self, num_vision_tokens: int | None = None) -> float:
        """The paper's budget: mean over all decoder layers of the vision tokens of one image each layer sees."""
        tokens_per_layer = self.vision_tokens_per_layer(num_vision_tokens)
        return sum(tokens_per_layer) / len(tokens_per_layer)

    @property
    def schedule(self) -> dict:
        """The pruning schedule as config keys: `adsc_pruning_layers`, `adsc_drop_ratio` and `adsc_keep_policy`.

        `model.config.update(other.schedule)` switches a loaded model to another config's schedule.
        """
        return {
            "adsc_pruning_layers": list(self.adsc_pruning_layers),
            "adsc_drop_ratio": self.adsc_drop_ratio,
            "adsc_keep_policy": self.adsc_keep_policy,
        }

    def with_budget(
        self, budget: float | None, pruning_layers: list[int] | None = None, *, fraction: float | None = None
    ):
        """A copy of this config whose schedule reaches `budget` average vision tokens per layer.

        Args:
            budget: target mean, over all decoder layers, of the vision tokens each layer sees, for one image of
                `reference_vision_tokens` tokens (LLaVA-1.5: 576, so e.g. 192). `r` is the smallest drop ratio that
                does not exceed it (`solve_drop_ratio`). None (and no `fraction`): no pruning.
            pruning_layers: the pruning layers; default this config's own, or, if it has none, its keep policy's
                (`policy_pruning_layers`: ADSC's `[2, 8, 16, 24]` of 32, FastV's `[2]`, PyramidDrop's `[8, 16, 24]`,
                scaled to the depth).
            fraction: the budget as a share of `reference_vision_tokens` instead (1/3 is LLaVA-1.5's 192 of 576).

        Raises:
            ValueError: for malformed layers, or a budget they cannot reach (the message gives the reachable range).
        """
        if fraction is not None:
            if budget is not None:
                raise ValueError("Give either budget or fraction, not both.")
            budget = fraction * self.reference_vision_tokens
        num_layers = self.text_config.num_hidden_layers
        if budget is None:
            pruning_layers, drop_ratio = [], 0.0
        else:
            if pruning_layers is None:
                pruning_layers = self.adsc_pruning_layers or policy_pruning_layers(self.adsc_keep_policy, num_layers)
            pruning_layers = list(pruning_layers)
            validate_schedule(num_layers, pruning_layers, 0.0)
            drop_ratio = solve_drop_ratio(num_layers, pruning_layers, self.reference_vision_tokens, budget)
        config_dict = self.to_dict()
        config_dict.update(adsc_pruning_layers=pruning_layers, adsc_drop_ratio=drop_ratio)
        return type(self).from_dict(config_dict)

    def to_stock_config(self):
        """The stock config of the same model: every field but the schedule and the remote-code keys."""
        config_dict = self.to_dict()
        for key in (*self.schedule, *REMOTE_CODE_KEYS, *self.EXTRA_FIELDS):
            config_dict.pop(key, None)
        return self.STOCK_CONFIG_CLASS(**config_dict)

    EXTRA_FIELDS: tuple[str, ...] = ()

    @classmethod
    def from_stock_config(
        cls,
        stock_config,
        *,
        pruning_layers: list[int] | None = None,
        drop_ratio: float | None = None,
        budget: float | None = None,
        keep_policy: str = "uniform",
    ):
        """Build an ADSC config from a stock config of the family and a schedule.

        Args:
            stock_config: the stock (or ADSC) config; all its fields are kept.
            pruning_layers: the pruning layers; defaults to the keep policy's own (`policy_pruning_layers`: the
                paper's `[2, 8, 16, 24]` for ADSC) scaled to the depth.
            drop_ratio: the drop ratio `r`. Give this or `budget`, not both; neither means no pruning.
            budget: target average vision tokens per layer (e.g. 192 of 576), solved by `with_budget`.
            keep_policy: which tokens each image keeps (`KEEP_POLICIES`); the counts do not depend on it.
        """
        if drop_ratio is not None and budget is not None:
            raise ValueError("Give either drop_ratio or budget, not both.")
        config_dict = stock_config.to_dict()
        for key in REMOTE_CODE_KEYS:
            config_dict.pop(key, None)
        config_dict.update(adsc_pruning_layers=[], adsc_drop_ratio=0.0, adsc_keep_policy=keep_policy)
        config = cls(**config_dict)
        if budget is not None:
            return config.with_budget(budget, pruning_layers)
        if pruning_layers is None:
            pruning_layers = (
                policy_pruning_layers(keep_policy, config.text_config.num_hidden_layers) if drop_ratio else []
            )
        config.update({"adsc_pruning_layers": list(pruning_layers), "adsc_drop_ratio": float(drop_ratio or 0.0)})
        validate_schedule(
            config.text_config.num_hidden_layers, config.adsc_pruning_layers, config.adsc_drop_ratio, keep_policy
        )
        return config


@strict
class AdscLlavaConfig(AdscScheduleMixin, LlavaConfig):
    r"""
    Configuration of [`AdscLlavaForConditionalGeneration`]: a [`LlavaConfig`] plus the ADSC pruning schedule.

    Args:
        adsc_pruning_layers (`list[int]`, *optional*, defaults to `[]`):
            0-based indices of the decoder layers at whose input the vision tokens are downsampled. Strictly
            increasing, each in `[1, text_config.num_hidden_layers)`. Empty means no pruning (stock LLaVA).
        adsc_drop_ratio (`float`, *optional*, defaults to 0.0):
            The drop ratio `r` in `[0, 1)`: at each pruning layer every image keeps `floor((1 - r) * n)` of the `n`
            vision tokens it still has.
        adsc_keep_policy (`str`, *optional*, defaults to `"uniform"`):
            Which tokens: `"uniform"` (ADSC: the positions `uniform_keep_positions` gives), or the baselines
            `"fastv"` / `"pyramiddrop"` (the most attended ones; `KEEP_POLICIES` says how each scores them).

    Example:

    ```python
    >>> from transformers import LlavaConfig
    >>> config = AdscLlavaConfig.from_llava_config(LlavaConfig(), budget=192)
    >>> config.adsc_pruning_layers, config.adsc_drop_ratio
    ([2, 8, 16, 24], 0.418)
    >>> config.average_vision_tokens()
    191.5625
    ```"""

    model_type = "adsc_llava"
    STOCK_CONFIG_CLASS = LlavaConfig
    AUTO_MAP = ADSC_AUTO_MAP

    adsc_pruning_layers: list[int] | None = None
    adsc_drop_ratio: float | int = 0.0
    adsc_keep_policy: str = "uniform"

    def to_llava_config(self) -> LlavaConfig:
        """The stock `LlavaConfig` of the same model: every field but the schedule and the remote-code keys."""
        return self.to_stock_config()

    @classmethod
    def from_llava_config(cls, llava_config: LlavaConfig, **schedule) -> "AdscLlavaConfig":
        """Build an ADSC config from a stock LLaVA config and a schedule (see `from_stock_config`)."""
        return cls.from_stock_config(llava_config, **schedule)


# `save_pretrained` copies this file next to config.json (transformers' `custom_object_save`) for remote code.
AdscLlavaConfig.register_for_auto_class("AutoConfig")

__all__ = ["AdscLlavaConfig"]
