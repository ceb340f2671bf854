"""Log-probabilities from `babyllama serve`, checked against the project's scorer, and lm-evaluation-harness (the
real `lm_eval` CLI, its `local-completions` model) scoring a multiple-choice task through the server: its
loglikelihoods equal `babyllama evaluate`'s `harness_scores` on the same items."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import pytest
from serve_fixtures import server, tiny_run

from babyllama.data.chat_template import render_prompt, stop_ids
from babyllama.eval.evaluate import cloze_accuracy, harness_scores, load_items
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.scoring import row_logprobs
from babyllama.shipped import IDIOMS, REPO_ROOT
from babyllama.train.checkpoint import load_model

TOL = 2e-4  # the server decodes with a KV cache, the scorer without: the same sums in another order


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logprobs") / "out"
    tiny_run(out)
    return out


@pytest.fixture(scope="module")
def url(run):
    with server(run, "--dtype", "fp32") as u:  # evaluation's precision: the numbers are comparable
        yield u


def model_of(run, tok, stage):
    return load_model(run / "baby" / stage, tokenizer=tok)


def test_chat_logprobs_are_the_models_and_stream_the_same(client, run, tok):
    messages = [{"role": "user", "content": "床前明月光"}]
    reply = client.chat.completions.create(model="sft", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    text = b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace")
    assert len(content) == 8 and text == reply.choices[0].message.content
    prompt, model = render_prompt(messages, tok), model_of(run, tok, "sft")
    generated = Generator(model).generate([prompt], SamplingConfig(8, temperature=0), stop_ids(tok))[0]
    expected = row_logprobs(model, [prompt + generated])[0][len(prompt) - 1:]
    for entry, token, want in zip(content, generated, expected.tolist()):
        assert abs(entry.logprob - want) < TOL and bytes(entry.bytes) == tok.token_bytes[token]
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the sampled token is the most likely
    streamed = client.chat.completions.create(model="sft", messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    pieces = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="sft", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_completion_echo_scores_the_prompt(url, run, tok):
    text = "To be, or not to be"
    body = {"model": "pretrain", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}
    got = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    choice = got["choices"][0]
    ids = tok.encode(text, bos=True)
    expected = row_logprobs(model_of(run, tok, "pretrain"), [ids])[0].tolist()
    lp = choice["logprobs"]
    assert choice["text"] == text and got["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                                        "total_tokens": len(ids),
                                                        "prompt_tokens_details": {"cached_tokens": 0}}
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected)) < TOL
    assert all(len(top) in (2, 3) and math.isclose(top[t], v, abs_tol=1e-6)
               for top, t, v in zip(lp["top_logprobs"][1:], lp["tokens"][1:], lp["token_logprobs"][1:]))
    # offsets point into the text (the bos the server put first has none of its own)
    assert [text[o:o + len(t)] for o, t in zip(lp["text_offset"][1:], lp["tokens"][1:])] == lp["tokens"][1:]


def test_token_id_prompts_several_per_request(url, tok):
    a, b = tok.encode("To be", bos=True), tok.encode("床前", bos=True)
    got = httpx.post(f"{url}/v1/completions", json={"model": "pretrain", "prompt": [a, b], "max_tokens": 3,
                                                     "temperature": 0, "n": 2, "echo": True}, timeout=60).json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]
    assert got["choices"][0]["text"].startswith("To be") and got["choices"][2]["text"].startswith("床前")
    assert got["choices"][0]["text"] == got["choices"][1]["text"]  # greedy: both choices alike
    assert got["usage"]["prompt_tokens"] == len(a) + len(b) and got["usage"]["completion_tokens"] == 12
    alone = httpx.post(f"{url}/v1/completions", json={"model": "pretrain", "prompt": b, "max_tokens": 3,
                                                       "temperature": 0}, timeout=60).json()
    assert got["choices"][2]["text"] == "床前" + alone["choices"][0]["text"]


def test_tokenizer_routes_as_vllm(url, tok):
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["vocab_size"] == tok.vocab_size
    got = httpx.post(f"{url}/tokenize", json={"prompt": "To be</s>", "add_special_tokens": False}).json()
    assert got["tokens"] == tok.encode("To be") + [tok.eos_id] and got["count"] == len(got["tokens"])
    assert httpx.post(f"{url}/tokenize", json={"prompt": "To be"}).json()["tokens"][0] == tok.bos_id
    assert httpx.post(f"{url}/detokenize", json={"tokens": tok.encode("To be")}).json() == {"prompt": "To be"}


BAD = [  # (path, body, param, words)
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= 20"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs", "true or false"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens", ">= 1"),
    ("/v1/completions", {"logprobs": 21}, "logprobs", "<= 20"),
    ("/v1/completions", {"prompt": [1, 100000]}, "prompt", "token ids below"),
    ("/tokenize", {"prompt": 3}, "prompt", "string"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "token ids below"),
]


def test_bad_logprob_requests_are_openai_errors(url):
    for path, extra, param, words in BAD:
        base = ({"model": "sft", "messages": [{"role": "user", "content": "hi"}]} if "chat" in path
                else {"model": "pretrain", "prompt": "hi"} if "completions" in path else {})
        r = httpx.post(f"{url}{path}", json={**base, **extra})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and words in error["message"], (path, error)


def test_lm_eval_through_the_server_equals_babyllama_scores(url, run, tok, tmp_path):
    items_path = tmp_path / "idioms.jsonl"
    items_path.write_text("".join(f"{line}\n" for line in IDIOMS.read_text(encoding="utf-8").splitlines()[:24]),
                          encoding="utf-8")
    task = (REPO_ROOT / "data/eval/lm_eval/idiom_cloze.yaml").read_text(encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(task.replace("data/eval/idiom_cloze.jsonl", str(items_path)))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--include_path", str(tmp_path / "tasks"),
         "--tasks", "babyllama_idiom_cloze", "--output_path", str(tmp_path / "results"), "--log_samples",
         "--model_args", f"base_url={url}/v1/completions,model=pretrain,tokenizer_backend=remote,max_length=512"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "results").rglob("samples_*.jsonl")
               for line in path.read_text(encoding="utf-8").splitlines()]
    items = load_items(items_path)
    model = model_of(run, tok, "pretrain")
    ours = harness_scores(model, tok, items)
    assert len(samples) == len(items)
    for sample in samples:
        theirs = [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]]
        assert max(abs(a - b) for a, b in zip(theirs, ours[sample["doc_id"]])) < TOL
    result = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    acc = result["results"]["babyllama_idiom_cloze"]["acc,none"]
    assert acc == cloze_accuracy(model, tok, items, harness_scores)
    cli = subprocess.run([sys.executable, "-m", "babyllama", "evaluate", "--out", str(run), "--name", "baby",
                          "--stage", "pretrain", "--items", str(items_path), "--max-docs", "2", "--no-baseline"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads((run / "baby" / "eval" / "pretrain.json").read_text())["metrics"]["idioms_acc"] == acc
