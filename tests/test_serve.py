"""`babyllama serve` against real clients: the official `openai` package (and raw HTTP where the wire itself is
checked) talking to a server process on 127.0.0.1 that serves a tiny run made here.

Covered: models/health, greedy = `sft/infer.py`, streaming chunks + usage + [DONE], model-ended replies, seeds,
top_k/top_p honoured, stop strings across token boundaries, completions, every bad input as an OpenAI error,
concurrent streams decoded together (each equal to its solo reply, a killed client disturbing nobody), 429 when
full, disconnects freeing rows, API key, no CORS; the model card's `python serve/server.py` serves the same."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI
from serve_fixtures import server, tiny_run

from babyllama.data.chat_template import render_prompt
from babyllama.errors import UserError
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.serve.process import free_port
from babyllama.shipped import REPO_ROOT as ROOT
from babyllama.train.checkpoint import load_model

ROWS, WAITING = 12, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "out"
    tiny_run(out)
    return out


@pytest.fixture(scope="module")
def url(run):
    with server(run, "--max-batch", str(ROWS), "--max-waiting", str(WAITING), "--max-body-bytes", "65536") as u:
        yield u


def ask(client, content="你好", model="sft", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def stream_text(client, content="你好", **kw) -> tuple[list[str], list]:
    chunks = list(ask(client, content, stream=True, **kw))
    return [c.choices[0].delta.content or "" for c in chunks if c.choices], chunks


def wait_idle(url, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = httpx.get(f"{url}/health").json()
        if (load["decoding"], load["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def test_models_health_and_no_cors(client, url):
    assert [m.id for m in client.models.list()] == ["pretrain", "sft", "dpo"]
    assert client.models.retrieve("dpo").id == "dpo"
    with pytest.raises(openai.NotFoundError, match="'ppo' does not exist; this run has: pretrain, sft, dpo"):
        ask(client, model="ppo")
    health = httpx.get(f"{url}/health", headers={"Origin": "https://elsewhere.example"})
    assert health.json()["status"] == "ok" and "access-control-allow-origin" not in health.headers
    preflight = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert httpx.get(f"{url}/health", headers={"Host": "attacker.example"}).status_code == 403  # DNS rebinding


def test_greedy_equals_sft_infer_streamed_or_not(client, run, tok):
    question = "Who are you?"
    proc = subprocess.run([sys.executable, str(ROOT / "sft" / "infer.py"), "--out", str(run), "--device", "cpu",
                           "--temperature", "0", "--max-new-tokens", "12", "--prompt", question],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reply = ask(client, question, temperature=0, max_tokens=12)
    text = reply.choices[0].message.content
    assert proc.stdout == text + "\n" and len(text) >= 6
    assert reply.choices[0].finish_reason == "length" and reply.object == "chat.completion"
    prompt_len = len(render_prompt([{"role": "user", "content": question}], tok))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_len, 12, prompt_len + 12)

    pieces, chunks = stream_text(client, question, temperature=0, max_tokens=12,
                                 stream_options={"include_usage": True})
    assert "".join(pieces) == text and len([p for p in pieces if p]) >= 4  # it streamed, piece by piece
    assert chunks[0].choices[0].delta.role == "assistant" and {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_wire_format_ends_with_done(url):
    # greedy: a sampled reply of the tiny model may end with <|im_end|> within 3 tokens
    body = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_reply_ended_by_the_model(client):
    reply = ask(client, model="dpo")
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "stop")
    assert reply.usage.completion_tokens == 1  # the <|im_end|> it sampled
    _, chunks = stream_text(client, model="dpo")
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_top_k_top_p(client):
    a, b, c = (ask(client, temperature=1.0, max_tokens=16, seed=s).choices[0].message.content for s in (7, 7, 8))
    assert a == b != c
    greedy = ask(client, temperature=0, max_tokens=16).choices[0].message.content
    top_k = ask(client, temperature=1.5, extra_body={"top_k": 1}, max_tokens=16, seed=3)
    assert top_k.choices[0].message.content == greedy
    assert ask(client, temperature=1.5, top_p=1e-6, max_tokens=16, seed=3).choices[0].message.content == greedy
    assert ask(client, temperature=1.5, max_tokens=16, seed=3).choices[0].message.content != greedy
    two = ask(client, temperature=1.0, max_tokens=16, seed=7, n=2)
    assert two.choices[0].message.content == a != two.choices[1].message.content  # choice 0 keeps the seed
    ended = two.choices[1].finish_reason == "stop"  # a sampled <|im_end|> or </s>: then fewer than 16 tokens
    assert 16 < two.usage.completion_tokens < 32 if ended else two.usage.completion_tokens == 32


def test_stop_string_across_token_boundaries(client):
    pieces, _ = stream_text(client, "写一首诗", temperature=0, max_tokens=40)
    full = "".join(pieces)
    ends = [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))]  # token boundaries in the text
    cut = next(b for b in ends if 4 <= b <= len(full) - 3 and full.find(full[b - 2:b + 2]) == b - 2)
    stop = full[cut - 2:cut + 2]  # two characters from each side of a boundary
    stopped = ask(client, "写一首诗", temperature=0, max_tokens=40, stop=[stop, "never-there"])
    assert stopped.choices[0].message.content == full[:cut - 2]
    streamed, chunks = stream_text(client, "写一首诗", temperature=0, max_tokens=40, stop=stop)
    assert "".join(streamed) == full[:cut - 2] and chunks[-1].choices[0].finish_reason == "stop"


def test_completions_continue_the_prompt(client, run, tok):
    model = load_model(run / "baby" / "pretrain", tokenizer=tok)
    ids = Generator(model).generate([tok.encode("To be", bos=True)], SamplingConfig(10, temperature=0),
                                    [tok.eos_id])[0]
    got = client.completions.create(model="pretrain", prompt="To be", max_tokens=10, temperature=0)
    assert got.choices[0].text == tok.decode(ids) and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(tok.encode("To be", bos=True))
    streamed = client.completions.create(model="pretrain", prompt="To be", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text


BAD = [  # (body or raw bytes, status, param, words in the message)
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": "sft"}, 400, "messages", "non-empty list"),
    ({"model": "sft", "messages": []}, 400, "messages", "non-empty list"),
    ({"model": "sft", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "one of"),
    ({"model": "sft", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "string"),
    ({"model": "sft", "messages": [{"role": "user", "content": "床前明月光" * 150}]}, 400, "messages",
     "context is 512 tokens"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "required"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400, "temperature",
     "<= 2"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", "> 0"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 513}, 400, "max_tokens",
     "limit of 512"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "n": 13}, 400, "n", "<= 12"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop", "at most 4"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "seed": "x"}, 400, "seed", "integer"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400,
     "presence_penalty", "unsupported"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools[0]", "a name of letters"),
    ({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "frobnicate",
     "unsupported"),
    ({"model": "pretrain", "prompt": {"text": "x"}}, 400, "prompt", "string"),
    ({"model": "sft", "messages": [{"role": "user", "content": "x" * 70_000}]}, 413, None, "larger than"),
]


def test_every_bad_input_is_an_openai_error(url, client):
    for body, status, param, words in BAD:
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
        kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = httpx.post(f"{url}{path}", **kw)
        error = r.json()["error"]
        assert (r.status_code, error["param"]) == (status, param) and words in error["message"], (body, r.text)
        assert set(error) == {"message", "type", "param", "code"}
    assert httpx.post(f"{url}/v1/chat/completions", content=b"{}").status_code == 415  # not sent as JSON
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number"):
        ask(client, temperature=-1)
    # defaults of parameters this server lacks are accepted; the server is still fine after all of the above
    assert ask(client, max_tokens=2, presence_penalty=0, logprobs=False, user="me").choices[0].finish_reason


def test_concurrent_streams_are_batched_and_each_gets_its_own_reply(client, url):
    jobs = [(f"question {i} 你好", 100 + i) for i in range(ROWS - 1)]
    alone = [ask(client, q, temperature=1.0, max_tokens=24, seed=s) for q, s in jobs]
    solo = [r.choices[0].message.content for r in alone]
    before = wait_idle(url)
    results: dict[int, str] = {}
    start = threading.Barrier(len(jobs) + 1)

    def one(i: int) -> None:
        start.wait()
        results[i] = "".join(stream_text(client, jobs[i][0], temperature=1.0, max_tokens=24, seed=jobs[i][1])[0])

    def killed() -> None:  # a client that goes away mid-stream
        body = {"model": "sft", "messages": [{"role": "user", "content": "long"}], "max_tokens": 400, "stream": True}
        start.wait()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 8:
                    break

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))] + [threading.Thread(target=killed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(len(jobs))] == solo
    after = wait_idle(url)
    assert (after["decoding"], after["waiting"]) == (0, 0)  # the killed stream's row was freed
    steps, tokens = after["steps"] - before["steps"], after["row_steps"] - before["row_steps"]
    assert tokens > sum(r.usage.completion_tokens for r in alone) > 4 * steps  # together, not one after another


def test_full_server_answers_429_and_disconnects_free_rows(url):
    body = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "stream": True,
            "temperature": 0}  # greedy: this reply does not end before max_tokens
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "n": ROWS}) as every_row:
            lines = every_row.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            waiting = [http.stream("POST", f"{url}/v1/chat/completions", json=body) for _ in range(WAITING)]
            for w in waiting:
                w.__enter__()
            load = httpx.get(f"{url}/health").json()
            assert (load["decoding"], load["waiting"]) == (ROWS, WAITING)
            full = http.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
            assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
            for w in waiting:
                w.__exit__(None, None, None)
    assert wait_idle(url)["decoding"] == 0  # every row given back once its client left


def test_api_key(run):
    with server(run, env={"BABYLLAMA_API_KEY": "s3cret"}) as url:
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/health").status_code == 401
        assert httpx.get(f"{url}/").status_code == 200  # the page holds no data; it asks for the key
        good = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ask(good, max_tokens=2).usage.completion_tokens == 2


def test_the_serve_script_is_the_serve_command(run):
    """`python serve/server.py` (the shim the model card names) starts the same server."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve" / "server.py"), "--out", str(run), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.1)
        assert [m["id"] for m in models["data"]] == ["pretrain", "sft", "dpo"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_server_that_cannot_start_is_a_user_error(tmp_path):
    """A run that is not there: the server's own one-line error, as a UserError (one line from `main_guard`, as in
    `babyllama screenshot --out nowhere`), not a traceback around the server's stderr."""
    with pytest.raises(UserError) as e:
        with server(tmp_path / "nowhere"):
            pass
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'nowhere' / 'baby' / 'tokenizer'}: tokenizer not found"), message
    assert "\n" not in message and "error:" not in message and "Traceback" not in message


def test_metrics_count_what_was_served(client, url):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple, float]:
        text = httpx.get(f"{url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    wait_idle(url)
    before = scrape()
    replies = [ask(client, f"问{i}", max_tokens=5 + i, temperature=0) for i in range(3)]
    streamed = list(ask(client, "流", max_tokens=4, stream=True, stream_options={"include_usage": True}))
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    generated = sum(r.usage.completion_tokens for r in replies) + streamed[-1].usage.completion_tokens
    prompt = sum(r.usage.prompt_tokens for r in replies) + streamed[-1].usage.prompt_tokens
    assert delta("babyllama_requests_total", route="/v1/chat/completions", status="200") == 4
    assert delta("babyllama_generation_tokens_total", model="sft") == generated
    assert delta("babyllama_prompt_tokens_total", model="sft") == prompt
    assert delta("babyllama_time_to_first_token_seconds_count", model="sft") == 4
    assert delta("babyllama_e2e_request_latency_seconds_count", model="sft") == 4
    assert delta("babyllama_batch_size_count") >= 5 + 6 + 7 + 4 - 4  # a step per token (the last may not run)
    assert after[("babyllama_num_requests_waiting", ())] == 0
    assert httpx.get(f"{url}/metrics").headers["content-type"].startswith("text/plain")


def test_the_next_turn_reuses_the_conversation_so_far(client):
    history = [{"role": "user", "content": "床前明月光"}]
    first = client.chat.completions.create(model="sft", messages=history, max_tokens=6, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "疑是地上霜"}]
    second = client.chat.completions.create(model="sft", messages=history, max_tokens=6, temperature=0)
    # at least the first turn's prompt (the reply's text may tokenize differently when sent back)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
