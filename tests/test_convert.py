"""Conversion: HF export loads in transformers with the same logits, tokens and chat template; HF and bert4torch
imports reproduce the source model's logits (GGUF too); an imported model fine-tunes with sft/sft.py; bert4torch round
trip and parity against bert4torch itself."""
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_config
from tokenizers import pre_tokenizers

from babyllama.convert.bert4torch import (
    B4T_CONFIG,
    B4T_WEIGHTS,
    bert4torch_builder,
    export_bert4torch,
    import_bert4torch,
)
from babyllama.convert.hf import HF_WEIGHTS, export_hf, hf_model_config, import_hf
from babyllama.data.chat_template import render_prompt
from babyllama.data.corpus import iter_records
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.errors import UserError
from babyllama.model.config import ModelConfig, preset
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import atomic_save, load_model

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
TOL = 1e-4
ROPE_THETA = 30000.0  # of the random transformers models: not the default, so a dropped value shows
MESSAGES = [{"role": "user", "content": "床前明月光的下一句是什么？"}, {"role": "assistant", "content": "疑是地上霜。"},
            {"role": "user", "content": "And who wrote Hamlet?"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to reach the hub fails instead of downloading


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = [r["text"] for name in ("poetry_zh_heldout.jsonl", "shakespeare_en_heldout.jsonl")
             for r in itertools.islice(iter_records(CORPUS / name), 150)]
    out = tmp_path_factory.mktemp("tok")
    with pytest.warns(UserWarning):  # "few characters for the vocabulary": expected for a test tokenizer
        train_tokenizer(texts, 400, out)
    return out


def convert_config(vocab_size: int, tie: bool) -> ModelConfig:
    """The tiny config with the fields a converter maps set away from their defaults (rope theta, norm eps).
    init_std 0.1: logits far apart, so greedy argmax is not decided by fp32 rounding."""
    return tiny_config(vocab_size, dim=64, ffn_dim=160, rope_theta=50000.0, norm_eps=1e-6, tie_embeddings=tie,
                       init_std=0.1)


def save_stage_checkpoint(model: Llama, path: Path, prefix: str = "", extra: dict | None = None) -> Path:
    """A checkpoint as the stages write it (model + model_config; PPO prefixes `policy.`, RM adds a head)."""
    weights = {prefix + k: v for k, v in model.state_dict().items()} | (extra or {})
    atomic_save({"model": weights, "model_config": model.config.to_dict(), "step": 7}, path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def sample_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie,prefix", [(True, ""), (False, "policy.")])
def test_hf_export_loads_offline_with_same_logits_and_greedy_tokens(tmp_path, tok_dir, tie, prefix):
    torch.manual_seed(0)
    ours = Llama(convert_config(400, tie)).eval()
    ckpt = save_stage_checkpoint(ours, tmp_path / "stage" / "step_00000007.pt", prefix)
    out = export_hf(ckpt.parent, tok_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    x = sample_ids(400)
    assert (logits(hf, x) - logits(ours, x)).abs().max().item() <= TOL

    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    prompt = render_prompt(MESSAGES, Tokenizer.load(tok_dir))
    stops = hf.generation_config.eos_token_id
    assert sorted(stops) == [2, 5] and hf_tok.convert_ids_to_tokens(stops) == ["</s>", "<|im_end|>"]
    # no stops on either side: all 12 tokens are compared, so two replies cut empty at once cannot pass
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=None)
    mine = Generator(ours).generate([prompt], SamplingConfig(max_new_tokens=12, temperature=0))[0]
    assert len(mine) == 12 and mine == theirs[0, len(prompt):].tolist()


def test_hf_tokenizer_matches_ours_and_renders_the_chat_template(tmp_path, tok_dir):
    torch.manual_seed(0)
    ckpt = save_stage_checkpoint(Llama(convert_config(400, True)), tmp_path / "step_00000001.pt")
    out = export_hf(ckpt, tok_dir, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = Tokenizer.load(tok_dir)
    text = "床前明月光，疑是地上霜。\nTo be, or not to be: that is the question. 2024 ☃"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf_tok.decode(ours.encode(text)) == text
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert hf_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == render_prompt(MESSAGES, ours)


def test_reward_checkpoint_exports_its_language_model(tmp_path, tok_dir):
    torch.manual_seed(0)
    lm = Llama(convert_config(400, True)).eval()
    ckpt = save_stage_checkpoint(lm, tmp_path / "step_00000001.pt", extra={"score.weight": torch.randn(1, 64)})
    out = export_hf(ckpt, tok_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    x = sample_ids(400)
    assert (logits(hf, x) - logits(lm, x)).abs().max().item() <= TOL


def random_hf_llama(vocab: int, tie: bool):
    """A randomly initialised transformers LlamaForCausalLM: GQA, rope_theta and eps off their defaults."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                      rope_theta=ROPE_THETA, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(hf_cfg).eval()


def require(module: str, requirements: str) -> None:
    """Skip the test when an optional module is missing, or fail it under CI (which installs `requirements`)."""
    if module not in sys.modules and importlib.util.find_spec(module) is None:
        message = f"{module} is not installed: pip install -r {requirements}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("tie", [True, False])
def test_import_hf_reproduces_a_random_transformers_llama(tmp_path, tie):
    hf = random_hf_llama(320, tie)
    hf.save_pretrained(tmp_path / "hf")
    path = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert path.name == "step_00000000.pt"
    ours = load_model(path.parent)  # what --init / load_model read
    assert ours.config.rope_theta == ROPE_THETA and ours.config.tie_embeddings == tie
    x = sample_ids(320)
    assert (logits(ours, x) - logits(hf, x)).abs().max().item() <= TOL


# ---------------------------------------------------------------- GGUF (llama.cpp's format)
# A byte-level BPE vocabulary (tokenizer.ggml.model "gpt2", as SmolLM2's GGUF has): specials, the 256 byte
# symbols, and merges up to " the".
GGUF_TOKENS = ["<unk>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]
GGUF_MERGES = ["Ġ t", "h e", "Ġt he"]


def llama_cpp_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (its rotary pairs adjacent dimensions, HF pairs
    the two halves of a head); transformers' GGUF loader undoes it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf, path: Path) -> None:
    """`hf` as llama.cpp writes a LLaMA: llama.* metadata, F32 tensors under gguf's names, q/k rows permuted."""
    import gguf  # optional (requirements-gguf.txt): the caller checks with `require`

    cfg = hf.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    from babyllama.convert.gguf import add_llama_metadata  # the llama.* keys, as checked by llama.cpp itself

    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_metadata(w, hf_model_config(cfg.to_dict(), "random"), "tiny", gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(GGUF_TOKENS)
    w.add_token_merges(GGUF_MERGES)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(GGUF_TOKENS) - 3))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    tied = cfg.tie_word_embeddings  # a file without output.weight is read as tied
    for name, tensor in hf.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        module, kind = name.rsplit(".", 1)
        array = tensor.numpy().astype(np.float32)
        n_heads = next((n for proj, n in heads.items() if module.endswith(proj)), None)
        w.add_tensor(f"{names.get_name(module)}.{kind}", llama_cpp_rotary_rows(array, n_heads) if n_heads else array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [True, False])
def test_import_gguf_reproduces_the_model_it_was_written_from(tmp_path, tie):
    require("gguf", "requirements-gguf.txt")
    require("accelerate", "requirements-gguf.txt")
    hf = random_hf_llama(len(GGUF_TOKENS), tie)
    (tmp_path / "src").mkdir()
    write_llama_gguf(hf, tmp_path / "src" / "tiny.gguf")
    path = import_hf(tmp_path / "src", tmp_path / "imported", gguf_file="tiny.gguf")
    ours = load_model(path)
    assert (ours.config.n_kv_heads, ours.config.rope_theta, ours.config.tie_embeddings) == (2, ROPE_THETA, tie)
    x = sample_ids(len(GGUF_TOKENS))
    assert (logits(ours, x) - logits(hf, x)).abs().max().item() <= TOL  # F32 tensors: nothing lost
    tok = Tokenizer.load(tmp_path / "imported" / "tokenizer")
    assert tok.encode(" the") == [GGUF_TOKENS.index("Ġthe")] and tok.decode(tok.encode("the 床")) == "the 床"
    with pytest.raises(UserError, match="GGUF file not found"):
        import_hf(tmp_path / "src", tmp_path / "again", gguf_file="missing.gguf")


def test_import_gguf_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UserError, match=r"needs gguf: pip install -r requirements-gguf.txt"):
        import_hf(tmp_path, tmp_path / "out", gguf_file="m.gguf")


def test_import_hf_brings_the_tokenizer_and_round_trips_export(tmp_path, tok_dir):
    torch.manual_seed(0)
    src = Llama(convert_config(400, False)).eval()
    export_hf(save_stage_checkpoint(src, tmp_path / "a.pt"), tok_dir, tmp_path / "hf")
    path = import_hf(tmp_path / "hf", tmp_path / "imported")
    again = load_model(path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in src.state_dict().items())
    text = "举头望明月"
    assert Tokenizer.load(tmp_path / "imported" / "tokenizer").encode(text) == \
        Tokenizer.load(tok_dir).encode(text)


def test_an_imported_hf_llama_fine_tunes_with_sft(tmp_path, tok_dir):
    """A random transformers LLaMA of the `tiny` preset's sizes, imported, is what sft/sft.py --init trains."""
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**preset("tiny", tok.vocab_size).to_hf()))
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    init = import_hf(tmp_path / "hf", tmp_path / "imported")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": m["content"]},
                                                      {"role": "assistant", "content": "疑是地上霜。"}]},
                                        ensure_ascii=False) + "\n" for m in MESSAGES), encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "sft" / "sft.py"), "--model", "tiny", "--init", str(init),
           "--tokenizer", str(tmp_path / "imported" / "tokenizer"), "--train-data", str(chats),
           "--valid-data", str(chats), "--choice-data", "none", "--out", str(tmp_path / "out"),
           "--runs", str(tmp_path / "runs"), "--max-steps", "2", "--batch-size", "2", "--eval-every", "2",
           "--lr", "1e-3", "--warmup-steps", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, after = load_model(init).state_dict(), load_model(tmp_path / "out" / "baby" / "sft").state_dict()
    moved = max((after[k] - v).abs().max().item() for k, v in before.items())
    assert 0 < moved < 0.01  # two AdamW steps of lr 1e-3 from the imported weights, not from a fresh init


def test_import_refuses_what_it_cannot_represent(tmp_path):
    (tmp_path / "gpt").mkdir()
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(UserError, match="not a LLaMA"):
        import_hf(tmp_path / "gpt", tmp_path / "out")
    scaled = {**convert_config(300, True).to_hf(), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(UserError, match="rope_type"):
        hf_model_config(scaled, "config.json")
    torch.manual_seed(0)
    export_bert4torch(save_stage_checkpoint(Llama(convert_config(300, True)), tmp_path / "c.pt"), tmp_path / "b")
    (tmp_path / "b" / B4T_WEIGHTS).unlink()
    with pytest.raises(UserError, match="weights not found"):
        import_bert4torch(tmp_path / "b", tmp_path / "out")


def test_bert4torch_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    src = Llama(convert_config(300, False)).eval()
    out = export_bert4torch(save_stage_checkpoint(src, tmp_path / "a.pt"), tmp_path / "b4t")
    config = json.loads((out / B4T_CONFIG).read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["num_key_value_heads"] == 2
    back = load_model(import_bert4torch(out, tmp_path / "back"))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in src.state_dict().items())


# ---------------------------------------------------------------- parity against bert4torch 0.6.2 itself
@pytest.fixture(scope="module")
def bert4torch():
    require("bert4torch", "requirements-bert4torch.txt")
    return bert4torch_builder()


@pytest.mark.parametrize("tie,padded", [(True, False), (False, False), (True, True)])
def test_bert4torch_loads_our_export_with_same_logits(tmp_path, bert4torch, tie, padded):
    """padded: an embedding of 320 rows for a 300-token tokenizer (a seed-scale preset's padding) is exported as
    the tokenizer's 300 rows, which bert4torch builds and loads strictly."""
    torch.manual_seed(0)
    cfg = convert_config(320, tie).for_tokenizer(300) if padded else convert_config(300, tie)
    ours = Llama(cfg).eval()
    out = export_bert4torch(save_stage_checkpoint(ours, tmp_path / "a.pt"), tmp_path / "b4t")
    assert json.loads((out / B4T_CONFIG).read_text())["vocab_size"] == 300
    theirs = bert4torch(config_path=str(out / B4T_CONFIG))
    theirs.load_state_dict(torch.load(out / B4T_WEIGHTS), strict=True)
    x = sample_ids(300)
    assert (logits_b4t(theirs, x) - logits(ours, x)[..., :300]).abs().max().item() <= TOL


def test_bert4torch_reads_the_hf_export_and_we_import_its_weights(tmp_path, bert4torch, tok_dir):
    torch.manual_seed(0)
    ours = Llama(convert_config(400, True)).eval()
    hf_dir = export_hf(save_stage_checkpoint(ours, tmp_path / "a.pt"), tok_dir, tmp_path / "hf")
    theirs = bert4torch(config_path=str(hf_dir / B4T_CONFIG), checkpoint_path=str(hf_dir / HF_WEIGHTS))
    x = sample_ids(400)
    assert (logits_b4t(theirs, x) - logits(ours, x)).abs().max().item() <= TOL
    # a model bert4torch trained, saved with its own parameter names (torch4keras save_weights)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(theirs.state_dict(), hf_dir / "trained.pt")
    back = load_model(import_bert4torch(hf_dir, tmp_path / "back", weights=hf_dir / "trained.pt"))
    assert (logits(back, x) - logits_b4t(theirs, x)).abs().max().item() <= TOL


def logits_b4t(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).float()


# ---------------------------------------------------------------- an existing --dest
def test_every_export_and_import_refuses_a_non_empty_dest_without_overwrite(tmp_path, tok_dir, capsys):
    """The rule of `data tokenizer`, `data prepare` and `export gguf`: a non-empty --dest is refused in one line
    (before any work), and --overwrite replaces only what the command writes."""
    from babyllama.cli import main_guard
    from babyllama.commands import convert

    torch.manual_seed(0)
    model = Llama(convert_config(400, False)).eval()
    ckpt = save_stage_checkpoint(model, tmp_path / "stage" / "step_00000001.pt")
    hf, b4t = export_hf(ckpt, tok_dir, tmp_path / "hf"), export_bert4torch(ckpt, tmp_path / "b4t")
    commands = {"export hf": (convert.main_export_hf, ["--ckpt", str(ckpt), "--tokenizer", str(tok_dir)]),
                "export bert4torch": (convert.main_export_bert4torch, ["--ckpt", str(ckpt)]),
                "import hf": (convert.main_import_hf, [str(hf)]),
                "import bert4torch": (convert.main_import_bert4torch, [str(b4t)])}
    for name, (main, args) in commands.items():
        dest = tmp_path / name.replace(" ", "_")
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
        with pytest.raises(SystemExit) as stop:
            main_guard(lambda main=main, args=args, dest=dest: main([*args, "--dest", str(dest)]))
        assert stop.value.code == 2, name
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {dest} is not empty (1 entries); pass --overwrite"), err
        assert [p.name for p in dest.iterdir()] == ["notes.txt"]  # nothing written, nothing left beside it
        main([*args, "--dest", str(dest), "--overwrite"])
        assert (dest / "notes.txt").read_text() == "mine", name
        loaded = load_model(dest / "step_00000000.pt" if name.startswith("import") else
                            import_bert4torch(dest, tmp_path / "back") if "bert4torch" in name else
                            import_hf(dest, tmp_path / "back_hf"))
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items()), name
    assert not [p for p in tmp_path.rglob(".*")], "a temp file or directory was left"


def test_overwrite_replaces_the_commands_own_files_and_drops_its_stale_ones(tmp_path, tok_dir):
    torch.manual_seed(0)
    first, second = Llama(convert_config(400, True)).eval(), Llama(convert_config(400, False)).eval()
    ckpt1 = save_stage_checkpoint(first, tmp_path / "one.pt")
    ckpt2 = save_stage_checkpoint(second, tmp_path / "two.pt")
    hf = export_hf(ckpt1, tok_dir, tmp_path / "hf")
    assert (hf / "tokenizer.model").is_file()
    # a Hugging Face tokenizer has no tokenizer.model: the first export's would be loaded in its place
    export_hf(ckpt2, tok_dir / "tokenizer.json", hf, overwrite=True)
    assert not (hf / "tokenizer.model").exists() and json.loads((hf / "config.json").read_text())[
        "tie_word_embeddings"] is False
    # an import replaces the checkpoints there (a newer step would be loaded instead of it) and the tokenizer
    dest = tmp_path / "imported"
    import_hf(hf, dest)
    save_stage_checkpoint(first, dest / "step_00000500.pt")
    (dest / "run.json").write_text("{}")
    b4t = export_bert4torch(ckpt1, tmp_path / "b4t")
    path = import_bert4torch(b4t, dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["run.json", "step_00000000.pt"]  # no tokenizer in bert4torch
    back = load_model(dest)
    assert path == dest / "step_00000000.pt"
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in first.state_dict().items())
