"""Generation: KV-cache greedy equals full recompute, batching with left padding, sampling filters; sampling values
and prompts checked against the model's context."""
import io
from dataclasses import replace

import pytest
import torch
from tiny import tiny_config

from babyllama.errors import UserError
from babyllama.model.generate import (
    Generator,
    SamplingConfig,
    apply_repetition_penalty,
    fit_context,
    reference_generate,
    sample_next,
)
from babyllama.model.llama import Llama

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0)


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_config(97)).eval()


def greedy_by_recompute(model: Llama, prompt: list[int], n: int) -> list[int]:
    return reference_generate(model, prompt, replace(GREEDY, max_new_tokens=n))


def test_stream_greedy_equals_full_recompute():
    m = tiny_model()
    prompt = [5, 17, 3, 88]
    assert list(Generator(m).stream(prompt, GREEDY)) == greedy_by_recompute(m, prompt, 12)


def test_batch_with_left_padding_equals_single_prompts():
    m = tiny_model()
    prompts = [[5, 17, 3, 88, 9, 1], [42], [7, 7]]
    gen = Generator(m)
    batched = gen.generate(prompts, GREEDY)
    assert batched == [greedy_by_recompute(m, p, 12) for p in prompts]


def test_stop_token_ends_stream():
    m = tiny_model()
    first = greedy_by_recompute(m, [5, 17], 3)
    out = list(Generator(m).stream([5, 17], GREEDY, stop_ids=[first[2]]))
    assert out == first[:2]


def test_fixed_cache_length_is_respected():
    m = tiny_model()
    out = list(Generator(m, max_len=10).stream([1, 2, 3], SamplingConfig(max_new_tokens=100, temperature=0)))
    assert len(out) == 8  # 3 prompt + 7 fed back fill the 10 slots, plus the last sampled token
    with pytest.raises(UserError, match="the prompt has 10 tokens, leaving no room in a cache of 10"):
        list(Generator(m, max_len=10).stream(list(range(10)), GREEDY))


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]])
    g = torch.Generator().manual_seed(0)
    k1 = [int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=1, top_p=1.0), g)) for _ in range(20)]
    assert set(k1) == {0}
    p = [int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=0, top_p=0.7), g)) for _ in range(50)]
    assert set(p) <= {0, 1}


def test_top_k_keeps_exactly_k_of_tied_logits_the_lowest_ids_first():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]])  # bf16 decoding makes such ties common
    g = torch.Generator().manual_seed(0)
    k1 = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=1, top_p=1.0), g)) for _ in range(30)}
    assert k1 == {int(logits.argmax())} == {1}  # top_k=1 agrees with greedy
    k2 = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=1.0), g)) for _ in range(60)}
    assert k2 == {1, 2}


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_compiled_decode_step_gives_the_eager_tokens():
    """The compiled step (one fixed cache shape for every call) is the eager step token for token, for a
    left-padded batch and for a stream that reuses the captured shapes."""
    m = tiny_model()
    prompts = [[5, 17, 3, 88, 9, 1], [42], [7, 7]]
    compiled = Generator(m, compile=True)
    assert compiled.max_len == m.config.max_seq_len
    assert compiled.generate(prompts, GREEDY) == Generator(m).generate(prompts, GREEDY)
    assert list(compiled.stream([5, 17], GREEDY)) == greedy_by_recompute(m, [5, 17], 12)


def test_sampled_stream_is_reproducible_and_stops_at_a_stop_token():
    """Sampling draws from the generator in token order: the same seed gives the same reply, and a stop id
    ends the stream in the middle of the pipelined loop."""
    m = tiny_model()
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=0, top_p=1.0)
    runs = [list(Generator(m).stream([3, 4], cfg, generator=torch.Generator().manual_seed(7))) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 30
    stop = runs[0][10]
    cut = list(Generator(m).stream([3, 4], cfg, stop_ids=[stop], generator=torch.Generator().manual_seed(7)))
    assert cut == runs[0][:runs[0].index(stop)]


@pytest.mark.parametrize("cfg", [SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9),
                                 SamplingConfig(max_new_tokens=20, temperature=0.7, repetition_penalty=1.3)])
def test_sampled_stream_equals_the_plain_reference_loop(cfg):
    """Same seed, same tokens: the cached, pipelined `Generator` is the dozen-line `reference_generate`."""
    m = tiny_model()
    fast = list(Generator(m).stream([3, 4, 9], cfg, generator=torch.Generator().manual_seed(5)))
    assert fast == reference_generate(m, [3, 4, 9], cfg, generator=torch.Generator().manual_seed(5))
    assert len(fast) == 20


def test_fused_generator_follows_weight_updates():
    """A Generator with fused projections refreshes them every call (PPO-style: sample, train, sample again)."""
    m = tiny_model()
    fused = Generator(m, fuse_projections=True)
    assert fused.generate([[5, 17]], GREEDY) == Generator(m).generate([[5, 17]], GREEDY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert fused.generate([[5, 17]], GREEDY) == [greedy_by_recompute(m, [5, 17], 12)]


@pytest.mark.parametrize("field,value,message", [
    ("top_p", -1.0, "--top-p -1.0: must be in (0, 1] (1 = off)"), ("top_p", 2.0, "--top-p 2.0: must be in (0, 1]"),
    ("repetition_penalty", 0.0, "--repetition-penalty 0.0: must be a positive number"),
    ("repetition_penalty", -1.0, "--repetition-penalty -1.0: must be a positive number"),
    ("temperature", float("nan"), "--temperature nan: must be 0 (greedy) or a positive number"),
    ("temperature", -1.0, "--temperature -1.0: must be 0 (greedy)"), ("top_k", -5, "--top-k -5: must be 0 (off)"),
    ("max_new_tokens", 0, "--max-new-tokens 0: must be between 1 and the model's context, 64"),
    ("max_new_tokens", -1, "--max-new-tokens -1: must be between 1"),
    ("max_new_tokens", 10**8, "--max-new-tokens 100000000: must be between 1 and the model's context, 64"),
])
def test_sampling_values_out_of_range_are_one_line_naming_the_flag(field, value, message):
    cfg = replace(SamplingConfig(max_new_tokens=16), **{field: value})
    with pytest.raises(UserError) as e:
        cfg.check(64)
    assert str(e.value).startswith(message)
    SamplingConfig(max_new_tokens=64, temperature=0, top_k=0, top_p=1.0, repetition_penalty=0.5).check(64)


def test_a_prompt_longer_than_the_context_keeps_its_first_and_newest_tokens():
    notes, cfg = io.StringIO(), SamplingConfig(max_new_tokens=16)
    prompt, fitted = fit_context(list(range(1, 101)), cfg, 64, notes)  # budget: 64 - 16 = 48 tokens
    assert prompt == [1, *range(54, 101)] and fitted.max_new_tokens == 16
    assert notes.getvalue() == ("note: the prompt has 100 tokens; continuing from its last 47 (the model's context "
                                "is 64, --max-new-tokens 16)\n")
    prompt, fitted = fit_context([1, 2, 3], replace(cfg, max_new_tokens=64), 64, notes)  # the reply stops at 64
    assert prompt == [1, 2, 3] and fitted.max_new_tokens == 61 and notes.getvalue().count("\n") == 1
