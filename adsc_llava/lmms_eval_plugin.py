"""lmms-eval plugin: `lmms-eval --model adsc_llava --model_args pretrained=CKPT[,budget=B][,method=M][,layers=L]`.

lmms-eval finds this module through the `lmms_eval.models` entry point (`MANIFEST`); the rest of adsc_llava never
imports it, so the package does not depend on lmms-eval. The model class is lmms-eval's generic chat class with the
changes an ADSC checkpoint needs:
- checkpoints load as remote code (their modeling files travel with them);
- `budget` re-solves the checkpoint's schedule at load time, so one checkpoint gives a training-free budget sweep;
  `method` switches the keep policy (ADSC's "uniform", or the baselines "fastv" and "pyramiddrop") and `layers`
  the pruning layers ("2" for FastV's K = 2, "8/16/24" for PyramidDrop's stages), the counts staying ADSC's;
- inputs go to `device` (the parent sends them to cuda whenever `device_map` is "auto", its default);
- the processor pads on the left (generation appends on the right) and is not passed `audios=`, which LLaVA
  processors refuse.
Weights load in bfloat16, as the parent class loads every model.
"""

from typing import Any

from lmms_eval.models.chat.huggingface import Huggingface
from lmms_eval.models.registry_v2 import ModelManifest

from adsc_llava.configuration_adsc_llava import policy_pruning_layers

MANIFEST = ModelManifest(model_id="adsc_llava", chat_class_path="adsc_llava.lmms_eval_plugin.AdscLlava")


class LeftPaddingProcessor:
    """A processor that pads batches on the left and drops the media kinds LLaVA processors do not take."""

    def __init__(self, processor):
        self.processor = processor
        processor.tokenizer.padding_side = "left"

    def __call__(self, *args, audios=None, videos=None, **kwargs):
        if audios:
            raise ValueError("adsc_llava takes images and videos; this task gave audio.")
        if videos:
            kwargs["videos"] = videos
        return self.processor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


def resolve_schedule(config, budget: float | None, method: str | None, layers: str | int | None) -> dict:
    """The schedule keys for `config.update`: the checkpoint's, with the policy, layers and budget asked for.

    A budget for another policy than the checkpoint's, without `layers`, goes to that policy's own layers
    (`policy_pruning_layers`: FastV's K = 2 of 32, PyramidDrop's 8, 16, 24), not to the checkpoint's.
    """
    if layers is not None and budget is None:
        raise ValueError(f"layers={layers!r} needs a budget: the drop ratio is solved for the budget on those layers.")
    switched = method is not None and method != config.adsc_keep_policy
    # from_dict validates the policy's name; with_budget keeps it.
    config = type(config).from_dict({**config.to_dict(), **({"adsc_keep_policy": method} if method else {})})
    if budget is not None:
        pruning_layers = [int(layer) for layer in str(layers).split("/")] if layers is not None else None
        if pruning_layers is None and switched:
            pruning_layers = policy_pruning_layers(method, config.text_config.num_hidden_layers)
        config = config.with_budget(float(budget), pruning_layers)
    return config.schedule


class AdscLlava(Huggingface):
    """lmms-eval's generic chat model for ADSC checkpoints, optionally at a new budget.

    Args:
        pretrained: an ADSC checkpoint folder or hub id.
        budget: mean vision tokens per LLM layer for the checkpoint's reference input (e.g. 192 of LLaVA-1.5's
            576); None keeps the checkpoint's schedule, 0 < budget < reference tokens re-solves it.
        method: the keep policy (`KEEP_POLICIES`: uniform, fastv, pyramiddrop); None keeps the checkpoint's.
        layers: the pruning layers, "/"-separated (lmms-eval splits its arguments at commas); needs `budget`.
        device: where the model and inputs go ("cpu", "cuda", "cuda:1"); `device_map` spreads the model instead.
        max_batch_size: lmms-eval passes it to every model; the parent does not take it, so it is dropped.
        kwargs: the parent's options (batch_size, attn_implementation, system_prompt, ...).
    """

    def __init__(
        self,
        pretrained: str,
        budget: float | None = None,
        method: str | None = None,
        layers: str | int | None = None,
        device: str = "cuda",
        device_map: str | None = None,
        max_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(pretrained=pretrained, device=device, device_map=device_map, trust_remote_code=True, **kwargs)
        self.model.config.update(resolve_schedule(self.model.config, budget, method, layers))
        self.processor = LeftPaddingProcessor(self.processor)
