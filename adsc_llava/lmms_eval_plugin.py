"""lmms-eval plugin: `lmms-eval --model adsc_llava --model_args pretrained=CKPT[,budget=B][,method=M][,layers=L]`.

lmms-eval finds this module through the `lmms_eval.models` entry point (`MANIFEST`); the rest of adsc_llava never
imports it, so the package does not depend on lmms-eval. The model class is lmms-eval's generic chat class (loading,
devices, processes) with the changes an ADSC checkpoint and the LLaVA tasks need:
- checkpoints load as remote code (their modeling files travel with them);
- `budget` re-solves the checkpoint's schedule at load time, so one checkpoint gives a training-free budget sweep;
  `method` switches the keep policy (ADSC's "uniform", or the baselines "fastv" and "pyramiddrop") and `layers`
  the pruning layers ("2" for FastV's K = 2, "8/16/24" for PyramidDrop's stages), the counts staying ADSC's;
- its own `generate_until`: each task's generation kwargs (`until` stop strings, which end generation and cut the
  answer, as lmms-eval's own LLaVA models do; `max_new_tokens` capped at `max_new_tokens`, 1024 by default, where a
  task sets none; sampling), documents batched by similar prompt length, text-only documents and rows without an
  image (no empty image list reaches the processor), several images per document;
- inputs go to `device` (the parent sends them to cuda whenever `device_map` is "auto", its default);
- the processor pads on the left (generation appends on the right).
Weights load in bfloat16, as the parent class loads every model. Log-likelihood tasks are not supported (the parent
raises NotImplementedError for them).
"""

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.models.chat.huggingface import Huggingface
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from adsc_llava.evaluate import resolve_schedule

MANIFEST = ModelManifest(model_id="adsc_llava", chat_class_path="adsc_llava.lmms_eval_plugin.AdscLlava")


def truncate_at_stop_strings(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string (lmms-eval's convention for `until`)."""
    positions = [text.find(stop) for stop in until if stop]
    positions = [position for position in positions if position >= 0]
    return text[: min(positions)] if positions else text


def generation_options(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """A task's generation kwargs as `generate` keywords, and its stop strings.

    lmms-eval gives every task an `until` (its few-shot delimiter "\\n\\n" when the task names none); greedy unless a
    temperature above 0 is asked for; `max_new_tokens` is the task's, else `default_max_new_tokens`.
    """
    gen_kwargs = dict(gen_kwargs)
    until = gen_kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.pop("temperature", 0) or 0)
    do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
    options = {
        "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", default_max_new_tokens)),
        "num_beams": int(gen_kwargs.pop("num_beams", 1)),
        "do_sample": do_sample,
    }
    if do_sample:
        options["temperature"] = temperature or 1.0
        if gen_kwargs.get("top_p") is not None:
            options["top_p"] = float(gen_kwargs["top_p"])
    return options, [stop for stop in until if stop]


class StopStrings(StoppingCriteria):
    """Ends a row of a batch once its generated text contains one of `stop_strings` (lmms-eval's `until`).

    The text is decoded whole at every step rather than matched token by token (transformers' `StopStringCriteria`
    precomputes per-token suffixes, which fails on tokenizers whose decoder joins words with spaces).
    """

    def __init__(self, tokenizer, stop_strings: list[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class AdscLlava(Huggingface):
    """lmms-eval's generic chat model for ADSC checkpoints, optionally at a new budget, with its own `generate_until`.

    Args:
        pretrained: an ADSC checkpoint folder or hub id.
        budget: mean vision tokens per LLM layer for the checkpoint's reference input (e.g. 192 of LLaVA-1.5's
            576); None keeps the checkpoint's schedule, 0 < budget < reference tokens re-solves it.
        method: the keep policy (`KEEP_POLICIES`: uniform, fastv, pyramiddrop); None keeps the checkpoint's.
        layers: the pruning layers, "/"-separated (lmms-eval splits its arguments at commas); needs `budget`.
        max_new_tokens: the cap on new tokens for tasks that set none (lmms-eval's LLaVA models use 1024).
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
        max_new_tokens: int = 1024,
        device: str = "cuda",
        device_map: str | None = None,
        max_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(pretrained=pretrained, device=device, device_map=device_map, trust_remote_code=True, **kwargs)
        self.model.config.update(resolve_schedule(self.model.config, budget, method, layers))
        self.max_new_tokens = int(max_new_tokens)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers in request order; batches hold requests with the same generation kwargs, longest prompts first."""
        # Grouped by generation kwargs (one `generate` call cannot mix them), sorted by prompt length within a group
        # so that a batch pads little; `get_original` restores the request order.
        reorder = utils.Collator(
            [request.args for request in requests],
            lambda args: (-len(args[0]), args[3]),
            group_fn=lambda args: args[2],
            grouping=True,
        )
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            contexts, doc_to_messages, all_gen_kwargs, doc_ids, tasks, splits = zip(*chunk, strict=True)
            conversations = [
                doc_to_messages[0](self.task_dict[task][split][doc_id])
                for doc_id, task, split in zip(doc_ids, tasks, splits, strict=True)
            ]
            if self.system_prompt:
                conversations = [self._apply_system_prompt(messages, self.system_prompt) for messages in conversations]
            answers, token_counts = self.generate_batch(
                [ChatMessages(messages=messages) for messages in conversations], all_gen_kwargs[0]
            )
            for context, answer, count in zip(contexts, answers, token_counts, strict=True):
                results.append(GenerationResult(text=answer, token_counts=TokenCounts(output_tokens=count)))
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), answer)
                progress.update(1)
        progress.close()
        return reorder.get_original(results)

    def generate_batch(self, conversations: list, gen_kwargs: dict) -> tuple[list[str], list[int]]:
        """One `generate` over `conversations` (lmms-eval `ChatMessages`); the answers cut at the stop strings and the
        number of tokens each one generated."""
        images, videos = [], []
        for conversation in conversations:
            conversation_images, conversation_videos, audios = conversation.extract_media()
            if audios:
                raise ValueError("adsc_llava takes images and videos; this task gave audio.")
            images += conversation_images
            videos += conversation_videos
        texts = [
            self.processor.apply_chat_template(
                conversation.to_hf_messages(), tokenize=False, add_generation_prompt=True
            )
            for conversation in conversations
        ]
        media = {"images": images} if images else {}  # text-only: an empty image list is not "no images"
        if videos:
            media["videos"] = videos
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **media).to(self.device)
        options, until = generation_options(gen_kwargs, self.max_new_tokens)
        prompt_length = inputs["input_ids"].shape[1]
        stopping = [StopStrings(self.processor.tokenizer, until, prompt_length)] if until else []
        output = self.model.generate(
            **inputs,
            **options,
            stopping_criteria=StoppingCriteriaList(stopping),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            use_cache=self.use_cache,
        )
        new_tokens = output[:, prompt_length:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        pad_token_id = self.processor.tokenizer.pad_token_id
        counts = [int((row != pad_token_id).sum()) for row in new_tokens]
        return [truncate_at_stop_strings(text, until) for text in texts], counts
