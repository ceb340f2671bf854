"""Prefix reuse: the cache finds the longest cached prefix, keeps within its byte budget (least recently used out);
`Generator` with it gives the tokens it gives without it (fp32 greedy: multi-turn, batched rows with different cached
lengths, compiled), counts the reused prompt tokens, stores what each row computed (also when closed early, as the
server's batch restarts do); `babyllama serve --prefix-cache-mb` reaches the served generators."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from serve_fixtures import tiny_run
from tiny import tiny_config

from babyllama.commands import serve as serve_command
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.model.generate import Generator, SamplingConfig, reference_generate
from babyllama.model.llama import Llama
from babyllama.model.prefix_cache import PrefixCache
from babyllama.serve.models import ModelRegistry
from babyllama.train.run_config import RunPaths

GREEDY = SamplingConfig(max_new_tokens=6, temperature=0)


def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of n tokens for a 1-layer, 1-head, 1-wide model: 8 bytes a token (fp32 K and V)."""
    return torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1)


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_config(97, max_seq_len=256)).eval()


def test_match_finds_the_longest_common_prefix_of_any_entry():
    cache = PrefixCache(1 << 20)
    for tokens in ([1, 2, 3, 4], [1, 2, 9], [1, 5], [7, 7, 7]):
        assert cache.store(tokens, *kv(len(tokens)))
    assert cache.match([1, 2, 3, 8])[0] == 3
    assert cache.match([1, 2, 9, 9, 9])[0] == 3 and cache.match([1, 2, 9, 9])[1].tokens == (1, 2, 9)
    assert cache.match([1, 5, 0])[0] == 2 and cache.match([1, 6])[0] == 1 and cache.match([1, 2])[0] == 2
    assert cache.match([7, 7])[0] == 2 and cache.match([8]) == (0, None) and cache.match([]) == (0, None)
    assert cache.holds([1, 2, 3]) and cache.holds([7, 7, 7]) and not cache.holds([1, 2, 3, 4, 5])
    assert not cache.store([1, 2], *kv(2)) and len(cache) == 4  # already held whole: nothing added


def test_a_longer_entry_replaces_its_prefix_and_the_budget_evicts_the_least_recently_used():
    cache = PrefixCache(100)  # 12 tokens of 8 bytes
    cache.store([1, 2, 3], *kv(3))
    cache.store([1, 2, 3, 4, 5], *kv(5))  # the next turn of the same conversation: [1, 2, 3] adds nothing now
    assert len(cache) == 1 and cache.nbytes == 40
    cache.store([2, 2, 2, 2], *kv(4))
    cache.store([3, 3], *kv(2))
    assert cache.nbytes == 88
    cache.match([1, 2, 3, 4, 5, 6])  # used: [2, 2, 2, 2] is now the least recently used
    cache.store([4, 4], *kv(2))
    assert cache.match([2, 2, 2, 2])[0] == 0 and cache.match([1, 2, 3, 4, 5])[0] == 5 and cache.nbytes == 72
    assert not cache.store(list(range(20)), *kv(20))  # alone above the budget: kept out, nothing evicted
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.match([1, 2]) == (0, None)


def test_multi_turn_greedy_is_unchanged_and_reuses_every_fed_token():
    """Each turn re-sends the conversation; the cache holds the previous turn's prompt and the reply tokens fed
    back (all but the last, which was sampled but never fed), so the next prompt computes from there."""
    m, cache = tiny_model(), PrefixCache(1 << 20)
    cached, plain = Generator(m, prefix_cache=cache), Generator(m)
    prompt, expected_reuse = [1, 5, 17, 3], 0
    for turn in range(5):
        reply = cached.generate([prompt], GREEDY)[0]
        assert reply == plain.generate([prompt], GREEDY)[0] == reference_generate(m, prompt, GREEDY)
        assert cached.reused == [expected_reuse] and plain.reused == [0]
        expected_reuse = len(prompt) + len(reply) - 1
        prompt = prompt + reply + [2, 40 + turn, 41, 42]  # the next user message
    assert len(cache) == 1  # each turn's entry replaced the previous one


def test_batched_rows_with_different_cached_prefixes_match_the_plain_batch():
    """The rows have 9, 2, 0 and 4 of their prompts' tokens cached; the prefill starts at the earliest uncached
    slot over the rows, so each row copies only what lies before it, and its count says how much that was."""
    m, cache = tiny_model(), PrefixCache(1 << 20)
    gen = Generator(m, prefix_cache=cache)
    long_row, short_row, new_row, whole_row = list(range(3, 15)), [60, 61, 62, 63, 64], [90, 91, 92], [7, 8, 9, 10]
    gen.generate([long_row[:9], short_row[:2], whole_row + [11, 12]], replace(GREEDY, max_new_tokens=1))
    prompts = [long_row, short_row, new_row, whole_row + [11]]
    expected = Generator(m).generate(prompts, GREEDY)
    assert gen.generate(prompts, GREEDY) == expected
    # left-padded to 12 slots, token i of a prompt sits in slot 12 - len(prompt) + i: rows 0, 1 and 2 first need
    # slot 9 (0 + 9, 7 + 2, 9 + 0), so row 3 computes again the 2 cached tokens it has from slot 9 on
    assert gen.reused == [9, 2, 0, 2]
    assert expected == [reference_generate(m, p, GREEDY) for p in prompts]
    without_new = [long_row, short_row, whole_row + [11]]
    assert gen.generate(without_new, GREEDY) == [expected[0], expected[1], expected[3]]
    assert gen.reused == [11, 4, 4]  # every row's whole prompt but its last token, stored by the previous call


def test_rows_are_stored_through_their_first_stop_token_only():
    m, cache = tiny_model(), PrefixCache(1 << 20)
    prompts = [[5, 17], [30, 31, 32]]
    free = Generator(m).generate(prompts, GREEDY)
    stop = free[0][2]
    assert stop not in free[1]  # row 1 runs to the budget while row 0 is fed fillers after its stop
    out = Generator(m, prefix_cache=cache).generate(prompts, GREEDY, stop_ids=[stop])
    assert out == [free[0][:2], free[1]]
    assert cache.match(prompts[0] + free[0][:3] + [stop, stop])[0] == 5  # through the stop, no filler
    assert cache.match(prompts[1] + free[1] + [1])[0] == 3 + 5  # the last token was sampled, never fed


def test_a_closed_generator_stores_its_rows_and_the_restart_reuses_them():
    """The server closes `generate_batch` when it restarts a batch: every token it was given had been fed, so the
    restarted rows (prompt + tokens so far) compute only their last token again, and continue as before."""
    m, cache = tiny_model(), PrefixCache(1 << 20)
    prompts = [[5, 17, 3, 88], [42, 6]]
    gen = Generator(m, prefix_cache=cache)
    full = Generator(m).generate(prompts, replace(GREEDY, max_new_tokens=8))
    steps = gen.generate_batch(prompts, replace(GREEDY, max_new_tokens=8))
    got = [next(steps).tolist() for _ in range(3)]
    steps.close()
    so_far = [p + [step[i] for step in got] for i, p in enumerate(prompts)]
    assert [cache.match(s + [0])[0] for s in so_far] == [7, 5]
    rest = gen.generate(so_far, replace(GREEDY, max_new_tokens=5))
    assert gen.reused == [6, 4]
    assert [s[len(p):] + r for s, p, r in zip(so_far, prompts, rest)] == full


def test_stream_stores_the_reply_for_the_next_turn():
    """`Generator.stream` (the chat's path) stores its row when the reply ends at a stop token."""
    m, cache = tiny_model(), PrefixCache(1 << 20)
    first = Generator(m).generate([[5, 17]], GREEDY)[0]
    gen = Generator(m, prefix_cache=cache)
    assert list(gen.stream([5, 17], GREEDY, stop_ids=[first[3]])) == first[:3]
    assert cache.match([5, 17, *first[:4], 9])[0] == 6


def test_compiled_generator_with_the_cache_gives_the_eager_tokens():
    m, cache = tiny_model(), PrefixCache(1 << 20)
    # two models: generators of one model share its cache buffers, and only notice when their own call resizes them
    compiled, plain = Generator(m, compile=True, prefix_cache=cache), Generator(tiny_model())
    prompts = [[5, 17, 3, 88, 9, 1], [42]]
    for turn in range(3):
        out = compiled.generate(prompts, GREEDY)
        assert out == plain.generate(prompts, GREEDY)
        # the previous turn's 5 fed reply tokens are cached; its 6th and the 2 new ones are computed
        assert compiled.reused == ([len(p) - 3 for p in prompts] if turn else [0, 0])
        prompts = [p + o + [2, 50 + turn] for p, o in zip(prompts, out)]


def test_the_serve_flag_reaches_the_served_generators(tmp_path, monkeypatch):
    out = tmp_path / "out"
    tiny_run(out, context=64, ending=False)
    paths, tok = RunPaths.of("baby", out), Tokenizer.load(out / "baby" / "tokenizer")
    assert serve_command.parse_args([]).prefix_cache_mb == 256
    cache = ModelRegistry(paths, tok, torch.device("cpu"), None, prefix_cache_mb=3).get("sft").generator.prefix_cache
    assert cache.max_bytes == 3 << 20 and len(cache) == 0
    assert ModelRegistry(paths, tok, torch.device("cpu"), None, prefix_cache_mb=0).get("sft").generator.prefix_cache \
        is None

    made = []
    monkeypatch.setattr(serve_command, "ModelRegistry", lambda *a: made.append(ModelRegistry(*a)) or made[-1])
    monkeypatch.setattr("babyllama.serve.app.create_app", lambda *a: None)
    monkeypatch.setattr("babyllama.serve.batcher.Batcher", lambda *a: None)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: None)
    serve_command.main(["--out", str(out), "--device", "cpu", "--prefix-cache-mb", "7"])
    assert made[-1].get("sft").generator.prefix_cache.max_bytes == 7 << 20
    with pytest.raises(UserError, match="--prefix-cache-mb -1: must be 0"):
        serve_command.main(["--out", str(out), "--prefix-cache-mb", "-1"])
