"""`adsc-llava serve`: transformers' OpenAI-compatible server answers the official client like the pipeline does.

The server runs as a separate process on localhost; the test waits until `/health` answers, sends one chat-completion
request with an image as a base64 data URL through the `openai` client, compares the answer with the in-process
`pipeline("image-text-to-text")` answer, and stops the server. Every wait is bounded.
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from transformers import pipeline

from conftest import save_word_answering_checkpoint

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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_word_answering_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-adsc", NEW_TOKENS)


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


def test_openai_client_gets_the_pipeline_answer(checkpoint, tmp_path):
    from test_remote_code import drawn_image

    image = drawn_image()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    expected = pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True)(
        text=messages, return_full_text=False
    )[0]["generated_text"]
    assert len(expected.split()) == NEW_TOKENS

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
    try:
        wait_until_healthy(server, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S)
        content = [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": data_url(image)}},
        ]
        completion = client.chat.completions.create(
            model=str(checkpoint), messages=[{"role": "user", "content": content}], max_tokens=NEW_TOKENS
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert completion.choices[0].message.content.strip() == expected.strip()
    assert completion.usage.completion_tokens == NEW_TOKENS


def test_continuous_batching_is_refused_with_the_reason(checkpoint):
    completed = subprocess.run(
        [sys.executable, "-m", "adsc_llava", "serve", str(checkpoint), "--continuous-batching"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "--continuous-batching is not supported: its paged KV cache gives every layer the same blocks" in (
        completed.stderr
    )
