"""`vllm serve --attention-backend CUSTOM` answers the OpenAI API on 127.0.0.1.

Specification: the server starts on our backend (its log carries our INFO line naming
torch_pagedkv, its version, cache dtype and block size) within 4 minutes, answers
/v1/completions and /v1/chat/completions through the `openai` client, streaming and not
(a stream's pieces concatenate to the non-streamed text, greedy), and shuts down within
a minute when the test is done.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60
MAX_TOKENS = 12
GREEDY = dict(temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, port: int, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running_server(checkpoint: str, log: Path, *args: str):
    """`vllm serve` on our backend at a free port, its output in ``log``: yields an
    openai client; stopped with SIGINT (killed if it does not stop in a minute)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", checkpoint,
           "--attention-backend", "CUSTOM", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "512", "--block-size", "32", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_healthy(proc, port, log)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                            timeout=60, max_retries=0)
    finally:
        proc.send_signal(signal.SIGINT)  # vLLM's graceful shutdown (engine and workers)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group
            proc.wait()
            pytest.fail(f"vllm serve did not stop within {STOP_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(checkpoints["llama"], log) as client:
        yield client, log


def test_server_runs_on_torch_pagedkv(server):
    _, log = server
    lines = [ln for ln in log.read_text().splitlines() if "Attention by torch_pagedkv" in ln]
    assert len(lines) == 1 and "kv cache dtype auto (torch.float32), block size 32" in lines[0]


def test_completions_streaming_and_not(server):
    client, _ = server
    full = client.completions.create(model="tiny", prompt="The paged KV cache", **GREEDY)
    assert full.usage.completion_tokens == MAX_TOKENS and full.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The paged KV cache", stream=True, **GREEDY)]
    assert len(pieces) > 1 and "".join(pieces) == full.choices[0].text


def test_chat_completions_streaming_and_not(server):
    client, _ = server
    messages = [{"role": "user", "content": "Hello! Tell me a story about attention."}]
    full = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert full.usage.completion_tokens == MAX_TOKENS and full.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, stream=True, **GREEDY)]
    assert "".join(pieces) == full.choices[0].message.content
