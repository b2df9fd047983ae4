"""`adsc-llava serve CHECKPOINT`: transformers' own OpenAI-compatible server, with ADSC-LLaVA checkpoints loadable.

`transformers serve` cannot load a remote-code architecture: its model manager picks the model class with
`getattr(transformers, config.architectures[0])` unless the model type is in transformers' own multimodal table, and
it tells vision-language models from LLMs by the class name. `AdscModelManager` overrides exactly those two steps;
everything else (the FastAPI app, the chat-completion handler, image decoding from data URLs, generation on an
inference thread) is transformers' `transformers.cli.serving`, wired as `transformers serve` wires it.

Continuous batching is refused: its paged cache gives every layer the same blocks, but after a pruning layer the
layers cache fewer tokens (`AdscLlavaForConditionalGeneration.init_continuous_batching` says so too).
"""

import argparse
import sys

from PIL import UnidentifiedImageError

from adsc_llava.cli import prog
from adsc_llava.families import FAMILIES

ADSC_MODEL_TYPES = tuple(family.adsc_type for family in FAMILIES)
# What a request's own content can make the model or processor raise (an image that is not one, more images than
# placeholders, a prompt over the context): a 400 naming the problem, not a bare 500.
REQUEST_ERRORS = (ValueError, UnidentifiedImageError)

EXAMPLES = """examples:
  adsc-llava serve llava-1.5-7b-adsc-192/                       # http://localhost:8000/v1/chat/completions
  adsc-llava serve out/final --port 8080 --device cuda:0 --dtype bfloat16

then, with the official client:
  from openai import OpenAI
  client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
  client.chat.completions.create(model="llava-1.5-7b-adsc-192/", messages=[{"role": "user", "content": [
      {"type": "text", "text": "What is this?"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])"""


def model_manager_class():
    """`transformers.cli.serving.model_manager.ModelManager` taught to load and classify ADSC-LLaVA checkpoints."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import Modality, split_revision

    class AdscModelManager(ModelManager):
        def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
            model_id, revision = split_revision(model_id_and_revision)
            config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=self.trust_remote_code)
            if config.model_type not in ADSC_MODEL_TYPES:
                return super()._load_model(model_id_and_revision, tqdm_class, progress_callback, gguf_file)
            return AutoModelForImageTextToText.from_pretrained(
                model_id,
                revision=revision,
                attn_implementation=self.attn_implementation,
                dtype=self.dtype,
                device_map=self.device,
                trust_remote_code=self.trust_remote_code,
                tqdm_class=tqdm_class,
            )

        @staticmethod
        def get_model_modality(model, processor=None) -> Modality:
            if getattr(model.config, "model_type", None) in ADSC_MODEL_TYPES:
                return Modality.VLM
            return ModelManager.get_model_modality(model, processor)

    return AdscModelManager


def build_app(
    checkpoint: str,
    *,
    device: str = "auto",
    dtype: str | None = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """The FastAPI app of `transformers serve`, pinned to `checkpoint`, built from transformers' serving classes."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    if not trust_remote_code:
        from adsc_llava import register_auto_classes

        register_auto_classes()  # the installed classes serve the checkpoint: none of its code runs
    model_manager = model_manager_class()(
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        continuous_batching=False,
        force_model=checkpoint,
    )
    generation_state = GenerationState(continuous_batching=False, compile=False, cb_config=None)
    handler_kwargs = {"model_manager": model_manager, "generation_state": generation_state}
    app = build_server(
        model_manager,
        ChatCompletionHandler(**handler_kwargs, chat_template_kwargs={}),
        completion_handler=CompletionHandler(**handler_kwargs),
        response_handler=ResponseHandler(**handler_kwargs, chat_template_kwargs={}),
        transcription_handler=TranscriptionHandler(model_manager, generation_state),
        systemone_handler=SystemOneHandler(**handler_kwargs, chat_template_kwargs={}, decision_config=None),
        generation_state=generation_state,
    )

    async def bad_request(request, error: Exception):
        from fastapi.responses import JSONResponse

        message = f"{type(error).__name__}: {error}"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=400)

    for error_class in REQUEST_ERRORS:
        app.add_exception_handler(error_class, bad_request)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("serve"),
        description="Serve an ADSC-LLaVA checkpoint with transformers' OpenAI-compatible server "
        "(/v1/chat/completions, /v1/models, /health).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="An ADSC-LLaVA checkpoint folder (or hub id); every request uses it.")
    parser.add_argument("--host", default="localhost", help="Listen address (default: localhost).")
    parser.add_argument("--port", type=int, default=8000, help="Listen port (default: 8000).")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ... (a device_map).")
    parser.add_argument("--dtype", default="auto", help="'auto' (the weights' own), 'bfloat16', 'float32', ...")
    parser.add_argument("--attn-implementation", default=None, help="eager, sdpa or flash_attention_2.")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Run the checkpoint's own modeling files instead of the installed adsc_llava classes.",
    )
    parser.add_argument(
        "--continuous-batching",
        action="store_true",
        help="Not supported: refused with the reason (ADSC's layers cache different numbers of tokens).",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.continuous_batching:
        parser.error(
            "--continuous-batching is not supported: its paged KV cache gives every layer the same blocks per "
            "request, but after a pruning layer ADSC's layers cache fewer tokens. Requests are served one "
            "generate() call at a time."
        )
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        parser.error("serving needs FastAPI, uvicorn, pydantic and openai: pip install 'adsc-llava[serve]'")
    import uvicorn

    app = build_app(
        args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code,
    )
    print(
        f"Serving {args.checkpoint} at http://{args.host}:{args.port}/v1 (Ctrl+C stops)", file=sys.stderr, flush=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
