"""Model: parity with HF LlamaForCausalLM, KV cache, masks, fused loss, compile-cleanliness."""
import pytest
import torch
import torch.nn.functional as F
import transformers

import babyllama.model.fused_cross_entropy as loss_mod
from babyllama.errors import UserError
from babyllama.model.config import ModelConfig, load_bert4torch_config, preset
from babyllama.model.llama import IGNORE_INDEX, Llama


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=64,
                rope_theta=50000.0)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("tie", [False, True])
def test_matches_hf_llama_logits(tie):
    torch.manual_seed(0)
    cfg = tiny_config(tie_embeddings=tie)
    ours = Llama(cfg).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_kv_cache_decoding_equals_full_recompute():
    torch.manual_seed(0)
    m = Llama(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full = m(x).logits
        m.setup_cache(batch=2, max_len=40)
        steps = [m(x[:, :9], input_pos=torch.arange(9)).logits]
        steps += [m(x[:, i:i + 1], input_pos=torch.tensor([i])).logits for i in range(9, 24)]
        m.clear_cache()
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_kv_cache_under_bf16_autocast_decodes_like_a_full_forward():
    """fp32 weights sampled under autocast (PPO's rollouts on a bf16 CPU or GPU): the cache takes the autocast
    dtype, and cached decoding agrees with a full forward in that precision."""
    torch.manual_seed(0)
    m = Llama(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = m(x).logits.float()
        m.setup_cache(batch=2, max_len=16)
        assert m.model.layers[0].self_attn.cache.k.dtype == torch.bfloat16
        steps = [m(x[:, :6], input_pos=torch.arange(6)).logits]
        steps += [m(x[:, i:i + 1], input_pos=torch.tensor([i])).logits for i in range(6, 12)]
        m.clear_cache()
    assert (torch.cat(steps, 1).float() - full).abs().max() < 0.1  # bf16 rounding, not a wrong cache


def test_fused_projections_decode_the_same_and_never_train():
    """Decoding with the fused q|k|v and gate|up copies gives the separate weights' logits; the copies stay out
    of the state dict, follow the weights when refreshed, and a training forward ignores them even when stale."""
    torch.manual_seed(0)
    m = Llama(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 12))

    def decoded() -> torch.Tensor:
        m.setup_cache(batch=2, max_len=16)
        return m(x, input_pos=torch.arange(12)).logits

    with torch.no_grad():
        plain = decoded()
        m.fuse_projections()
        assert (decoded() - plain).abs().max() < 1e-5
        assert m.model.layers[0].self_attn.qkv_weight.shape == (64 + 2 * 32, 64)
        assert set(m.state_dict()) == set(Llama(tiny_config()).state_dict())
        m.model.layers[1].mlp.up_proj.weight.mul_(2)  # the fused copies are stale now
        trained = m(x).logits
        stale = decoded()
        qkv = m.model.layers[0].self_attn.qkv_weight
        m.fuse_projections()
        assert m.model.layers[0].self_attn.qkv_weight.data_ptr() == qkv.data_ptr()  # refreshed in place
        refreshed = decoded()
        m.unfuse_projections()
        assert (decoded() - refreshed).abs().max() < 1e-5 and (trained - refreshed).abs().max() < 1e-5
        assert (stale - refreshed).abs().max() > 1e-2


def test_left_padding_mask_matches_unpadded():
    torch.manual_seed(0)
    m = Llama(tiny_config()).eval()
    x = torch.randint(0, 300, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = m(x).logits
        out = m(padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_loss_matches_cross_entropy_and_grads(monkeypatch, compiled):
    """Eager runs the in-place chunk code, compiled the single-expression one inductor fuses: both are exact."""
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 7 * 300)  # force several chunks
    torch.manual_seed(0)
    m = Llama(tiny_config())
    x, y = torch.randint(0, 300, (2, 2, 20)).unbind(0)
    y[0, :5] = IGNORE_INDEX
    loss = (torch.compile(m, fullgraph=True) if compiled else m)(x, y).loss
    loss.backward()
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    logits = m(x, return_logits=True).logits
    ref = F.cross_entropy(logits.view(-1, 300), y.view(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for n, p in m.named_parameters():
        assert (fused[n] - p.grad).abs().max() < 1e-5, n


def test_forward_compiles_without_graph_breaks():
    m = Llama(tiny_config()).eval()
    explanation = torch._dynamo.explain(m)(torch.randint(0, 300, (2, 16)))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_presets_and_param_count():
    cfg = preset("0.2b")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.vocab_size) == (1024, 12, 8, 2752, 64793)
    assert abs(cfg.num_params() / 1e6 - 218) < 1
    assert preset("1.1b").n_kv_heads == 4
    m = Llama(tiny_config(tie_embeddings=True))
    assert m.num_params() == tiny_config(tie_embeddings=True).num_params()
    with pytest.raises(UserError, match="unknown model preset"):
        preset("nope")


def test_bert4torch_config_loads(tmp_path):
    import json
    p = tmp_path / "bert4torch_config.json"
    p.write_text(json.dumps({
        "model": "llama", "layer_type": "LLMLayer", "attn_type": "RopeAttention", "pos_emb_type": "rotary",
        "mlp_type": "LlamaFeedForward", "layer_norm_mode": "rmsnorm", "final_layernorm": True, "use_bias": False,
        "tie_word_embeddings": True, "hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8,
        "intermediate_size": 2752, "vocab_size": 64793, "layer_norm_eps": 1e-6, "max_position_embeddings": 1024,
        "rope_theta": 10000.0}))
    cfg = load_bert4torch_config(p)
    assert cfg == preset("0.2b", norm_eps=1e-6)
    p.write_text(json.dumps({"hidden_size": 8, "pos_emb_type": "sinusoid"}))
    with pytest.raises(UserError, match="not a LLaMA"):
        load_bert4torch_config(p)
