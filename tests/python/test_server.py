"""`moestream serve` driven by the official `openai` client: chat and text completions (JSON and streaming),
tools accepted and tool messages through the template, errors mapped to the client's exception classes, and a
client that disconnects mid-stream (its generation must stop; the server must keep answering).

The model is a tiny synthetic one with random weights, so tests compare outputs with each other (stream vs JSON,
seed vs seed), never with expected text.
"""

import json
import re
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

KEY = "test-key"


@pytest.fixture(scope="module")
def server(ms):
    # Qwen3's real tokenizer and chat template (tools, tool messages, thinking), with random weights.
    model = ms.synth("gguf-q8_0", extra=("--tokenizer", "qwen3"))
    proc = subprocess.Popen(
        [str(ms.bin), "serve", "--model", str(model), "--port", "0", "--threads", "1", "--api-key", KEY,
         "--parallel", "2", "--ctx", "8192", "--model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until the server prints its address (or exits)
        m = re.search(r"listening on (http://\S+)", line)
        if not m:
            proc.kill()
            raise AssertionError(f"server did not start: {line!r}\n{proc.stderr.read()}")
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def http(method: str, url: str, body=None, key: str | None = KEY) -> tuple[int, str]:
    """A plain request with the standard library (the status and the body text, errors included)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(server) -> dict[str, float]:
    status, text = http("GET", f"{server}/metrics")
    assert status == 200, text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


MSGS = [{"role": "user", "content": "hello world"}]


def test_chat_stream_reassembles_to_the_json_answer(client):
    full = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=16)
    assert full.object == "chat.completion"
    assert full.id.startswith("chatcmpl-")
    assert full.model == "tiny"
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0 and 0 < full.usage.completion_tokens <= 16
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_seeded_sampling_is_reproducible(client):
    def run(seed):
        r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=1.5, seed=seed, max_tokens=24)
        return r.choices[0].message.content

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0,
                                                 stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_tools_are_accepted_and_tool_messages_round_trip(client, server):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=tools, tool_choice="auto",
                                       temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    status, text = http("POST", f"{server}/apply-template", {"messages": messages, "tools": tools})
    assert status == 200, text
    prompt = json.loads(text)["prompt"]
    assert "get_weather" in prompt.split("<|im_start|>user")[0]  # tools are described before the conversation
    assert '"city": "Paris"' in prompt or '"city":"Paris"' in prompt  # the assistant's call is in the history
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_bad_request_and_bad_key(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, n=2)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny", messages=MSGS)
    assert e.value.status_code == 401
    assert http("GET", f"{server}/health", key=None)[0] == 200
    status, text = http("GET", f"{server}/v1/models", key=None)
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"


def test_disconnecting_client_stops_its_generation(client, server):
    before = metrics(server)
    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8000, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert metrics(server)["moestream_requests_active"] == 1
    stream.close()
    deadline = time.time() + 30
    while True:
        m = metrics(server)
        if m["moestream_requests_active"] == 0:
            break
        assert time.time() < deadline, f"generation still running after the client left: {m}"
        time.sleep(0.05)
    assert m["moestream_requests_cancelled_total"] == before.get("moestream_requests_cancelled_total", 0) + 1
    generated = m["moestream_generated_tokens_total"]
    time.sleep(0.3)
    assert metrics(server)["moestream_generated_tokens_total"] == generated, "tokens still being generated"
    assert generated - before["moestream_generated_tokens_total"] < 8000
    # The server still answers.
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_enable_thinking_reaches_the_template(client):
    def prompt_tokens(**extra):
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1, temperature=0, **extra)
        return r.usage.prompt_tokens

    on = prompt_tokens()
    # Qwen3's template writes an empty `<think>\n\n</think>\n\n` block when thinking is off.
    off = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off > on
    assert prompt_tokens(extra_body={"enable_thinking": False}) == off
