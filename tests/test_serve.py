"""`adsc-llava serve`: transformers' OpenAI-compatible server answers the official client like the pipeline does.

For an ADSC checkpoint of each family (LLaVA-1.5, NeXT, OneVision), the server runs as a separate process on
localhost; the test waits until `/health` answers, sends two chat-completion requests at once (images as base64 data
URLs, through the `openai` client), compares each answer with the in-process `pipeline("image-text-to-text")` answer,
sends a request whose image is not one (a 400 naming the problem), checks the server still answers, and stops it.
Every wait is bounded.
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import pipeline

from adsc_llava.families import family_of
from adsc_llava.testing import DEMO_WORDS

from conftest import answer_in_words, save_word_answering_checkpoint

openai = pytest.importorskip("openai", reason="the serve test needs the openai client (the test extra installs it)")

NEW_TOKENS = 4
QUESTION = "what is in the image ?"
STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def drawn_image(background: str) -> Image.Image:
    image = Image.new("RGB", (40, 36), background)
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 6, 22, 24), fill="red")
    draw.ellipse((20, 14, 36, 30), fill="blue")
    return image


def save_next_word_answering_checkpoint(folder: Path, family: str) -> Path:
    """A tiny pruned ADSC NeXT / OneVision checkpoint whose greedy answers are `NEW_TOKENS` plain words (OneVision
    with the stand-in processor of `test_next_onevision.processor_and_stock_config`)."""
    from test_next_onevision import processor_and_stock_config

    processor, stock_config = processor_and_stock_config(family, DEMO_WORDS)
    family_config = family_of(stock_config.model_type)
    config = family_config.config_class.from_stock_config(stock_config, pruning_layers=[1, 2], drop_ratio=0.5)
    torch.manual_seed(0)
    model = family_config.model_class(config).eval()
    answer_in_words(model, processor.tokenizer, NEW_TOKENS)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llava", "next", "onevision"])
def checkpoint(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / f"tiny-adsc-{request.param}"
    if request.param == "llava":
        return save_word_answering_checkpoint(folder, NEW_TOKENS)
    return save_next_word_answering_checkpoint(folder, request.param)


def wait_until_healthy(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{server.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer /health within {STARTUP_TIMEOUT_S} s")


def test_openai_client_gets_the_pipeline_answers_concurrently_and_a_clear_400(checkpoint, tmp_path):
    images = [drawn_image("white"), drawn_image("green")]
    generate = pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True)
    expected = [
        generate(
            text=[
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}
            ],
            return_full_text=False,
        )[0]["generated_text"].strip()
        for image in images
    ]
    assert all(len(answer.split()) == NEW_TOKENS for answer in expected)

    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "adsc_llava",
        "serve",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        [*command, "--device", "cpu", "--dtype", "float32"], env=env, stderr=subprocess.PIPE, text=True
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S)

    def ask(image_url: str):
        content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": image_url}}]
        return client.chat.completions.create(
            model=str(checkpoint), messages=[{"role": "user", "content": content}], max_tokens=NEW_TOKENS
        )

    try:
        wait_until_healthy(server, port)
        with ThreadPoolExecutor(max_workers=2) as pool:  # two requests in flight at once
            completions = list(pool.map(ask, [data_url(image) for image in images]))
        with pytest.raises(openai.BadRequestError) as bad:
            ask("data:image/png;base64," + base64.b64encode(b"not an image").decode())
        after = ask(data_url(images[0]))  # still serving
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert [completion.choices[0].message.content.strip() for completion in completions] == expected
    assert all(completion.usage.completion_tokens == NEW_TOKENS for completion in completions)
    assert bad.value.status_code == 400 and "image" in str(bad.value).lower()
    assert after.choices[0].message.content.strip() == expected[0]


def test_continuous_batching_is_refused_with_the_reason(tmp_path):
    completed = subprocess.run(  # refused before any checkpoint is read
        [sys.executable, "-m", "adsc_llava", "serve", str(tmp_path), "--continuous-batching"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "--continuous-batching is not supported: its paged KV cache gives every layer the same blocks" in (
        completed.stderr
    )
