"""GGUF export, checked by llama.cpp itself (llama-cpp-python builds it from source): its tokenization equals ours,
its greedy continuation and logits equal ours (f32, f16; q8_0 within a measured agreement), its chat completion
with the file's own template equals our chat reply; bad input is refused with one clear line."""
import ctypes
import dataclasses
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("gguf") is None:  # the optional extra: skipped without it, a failure under CI
    if os.environ.get("CI"):
        raise ImportError("gguf is not installed: pip install -r requirements-gguf.txt")
    pytest.skip("gguf is not installed: pip install -r requirements-gguf.txt", allow_module_level=True)

import gguf  # noqa: E402
from test_convert import convert_config, require, tok_dir  # noqa: E402,F401  (tok_dir: the 400-token zh+en tokenizer)

from babyllama.chat.session import ChatSession  # noqa: E402
from babyllama.convert.gguf import export_gguf, modelfile_path, open_in_llama_cpp, to_interleaved_rope  # noqa: E402
from babyllama.convert.hf import import_hf  # noqa: E402
from babyllama.data.chat_template import render_prompt, stop_ids  # noqa: E402
from babyllama.data.tokenizer import Tokenizer  # noqa: E402
from babyllama.errors import UserError  # noqa: E402
from babyllama.model.generate import Generator, SamplingConfig  # noqa: E402
from babyllama.model.llama import Llama, apply_rope, rope_cos_sin  # noqa: E402
from babyllama.train.checkpoint import atomic_save, load_model  # noqa: E402

TOKENIZER_TEXTS = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",  # poetry
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",  # Shakespeare
    "李白 wrote 《静夜思》 in 726; Hamlet said: \"Words, words, words.\"",  # mixed
    "🦙 emoji 👍🏽 and rare 𠀀 龘 ĳ ß Ω ∑ café",  # characters outside the vocabulary: byte fallback
    "  leading spaces,\ttabs\n\nand   runs of  spaces  ",
    "12345 + 67.89 = 2024年",
    "<|im_start|>user\n你好<|im_end|>\n<s></s>",  # special-token spellings: plain text unless parsed as special
]
PROMPTS = ["床前明月光，", "To be, or not to be", "Hamlet 与 李白", "🦙"]
MESSAGES = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "床前明月光的下一句是什么？"},
            {"role": "assistant", "content": "疑是地上霜。"}, {"role": "user", "content": "And who wrote Hamlet?"}]
CONTEXT = 256  # llama.cpp allocates at least 256 positions; llama-cpp-python must be told as many
N_NEW = 40  # greedy tokens compared


def llama_cpp():
    require("llama_cpp", "requirements-gguf.txt")  # skip, or fail under CI=true
    import llama_cpp
    return llama_cpp


def tiny_model(tok: Tokenizer, tie: bool) -> Llama:
    """The 2-layer GQA test model, its embedding padded past the tokenizer as the seed-scale presets do."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(convert_config(448, tie), tokenizer_vocab_size=tok.vocab_size, max_seq_len=CONTEXT)
    return Llama(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok_dir):  # noqa: F811
    """Checkpoints (tied and untied) and their exports in every dtype: {(tie, dtype): path}, plus the models."""
    tok, out = Tokenizer.load(tok_dir), tmp_path_factory.mktemp("gguf")
    files, models = {}, {}
    for tie in (True, False):
        models[tie] = tiny_model(tok, tie)
        ckpt = out / f"tie{tie}" / "step_00000007.pt"
        atomic_save({"model": models[tie].state_dict(), "model_config": models[tie].config.to_dict(), "step": 7,
                     "extra": {"tokenizer": tok.fingerprint}}, ckpt)
        for dtype in ("f32", "f16", "q8_0"):
            files[tie, dtype] = export_gguf(ckpt.parent, tok_dir, out / f"tie{tie}-{dtype}.gguf", dtype)
    return files, models, tok


def load(path: Path, **kw):
    """The file in llama.cpp; logits of every position are kept (`llama_cpp_logits`). One thread: no OpenMP team
    of llama.cpp's waits beside torch's on the 2 cores (see docs/performance.md on OpenMP wait policies)."""
    llama_cpp()  # installed, or skip (fail under CI=true)
    return open_in_llama_cpp(path, n_ctx=CONTEXT, n_threads=1, verbose=False, logits_all=not kw.get("vocab_only"),
                             **kw)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy sampler (temperature 0), n tokens, not stopped at end tokens."""
    out = []
    for token in llm.generate(prompt, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


def our_greedy(model: Llama, prompt: list[int], n: int) -> list[int]:
    return Generator(model).generate([prompt], SamplingConfig(max_new_tokens=n, temperature=0))[0]


def our_logits(model: Llama, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :, : model.config.n_tokens].numpy()


# ======================================================================= file layout (no llama.cpp needed)
def test_permutation_maps_rotate_half_rope_to_interleaved_pairs():
    """llama.cpp rotates the pairs (2i, 2i+1) of the permuted q by angle i; that equals our rotate-half RoPE of q
    (pairs (i, i + d/2)), permuted the same way: q.k products, hence attention, are unchanged."""
    torch.manual_seed(0)
    T, H, D = 5, 2, 8
    w, x = torch.randn(H * D, 16), torch.randn(T, 16)
    cos, sin = rope_cos_sin(D, T, 10000.0)
    ours = apply_rope((x @ w.T).view(1, T, H, D).transpose(1, 2), cos[None], sin[None])[0].transpose(0, 1)
    ours = ours.reshape(T, H, 2, D // 2).transpose(-1, -2).reshape(T, H, D)  # the same permutation, per head
    q = (x @ to_interleaved_rope(w, H).T).view(T, H, D // 2, 2)
    c, s, a, b = cos[:, None, : D // 2], sin[:, None, : D // 2], q[..., 0], q[..., 1]
    theirs = torch.stack([a * c - b * s, a * s + b * c], -1).view(T, H, D)
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_file_metadata_vocab_and_modelfile(exported):
    files, _, tok = exported
    reader = gguf.GGUFReader(files[True, "q8_0"])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert field("llama.vocab_size") == tok.vocab_size == 400  # the padded rows (448) are cut
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert tokens == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[6:9] == ["<0x00>", "<0x01>", "<0x02>"] and types[6] == gguf.TokenType.BYTE
    assert [types[i] for i in range(6)] == [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 5
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.eot_token_id")) == (1, 2, 5)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in kinds and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.1.ffn_down.weight"] == "Q8_0"
    assert "output.weight" in {t.name for t in gguf.GGUFReader(files[False, "f32"]).tensors}
    modelfile = modelfile_path(files[True, "q8_0"]).read_text(encoding="utf-8")
    assert modelfile.startswith(f"FROM ./{files[True, 'q8_0'].name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 256" in modelfile


def test_transformers_reads_the_export_back_to_the_same_model(tmp_path, exported):
    """A second, independent reader of the weights: transformers' GGUF loader undoes llama.cpp's q/k permutation
    and gives back our logits. (Its tokenizer is not compared: transformers 5 ignores the file's add_space_prefix
    = false and prepends "▁" to every text; llama.cpp, the consumer, honours it, see the tokenization test.)"""
    require("accelerate", "requirements-gguf.txt")
    files, models, tok = exported
    for tie in (True, False):
        path = files[tie, "f32"]
        import_hf(path.parent, tmp_path / f"back{tie}", gguf_file=path.name)
        back = load_model(tmp_path / f"back{tie}")
        ids = tok.encode(TOKENIZER_TEXTS[2], bos=True)
        assert np.abs(our_logits(back, ids) - our_logits(models[tie], ids)).max() <= 1e-4


# ======================================================================= checked by llama.cpp
def test_llama_cpp_tokenizes_like_babyllama(exported):
    files, _, tok = exported
    llm = load(files[True, "f32"], vocab_only=True)
    for text in TOKENIZER_TEXTS:
        ours = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours, text
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, allow_special=True), text
        assert llm.detokenize(ours).decode() == text
    fallback = tok.encode(TOKENIZER_TEXTS[3])
    assert tok.unk_id not in fallback and sum(tok.id_to_token(i).startswith("<0x") for i in fallback) >= 12
    assert llm.tokenize(b"hi", add_bos=True, special=False)[0] == tok.bos_id
    assert (llm.token_bos(), llm.token_eos()) == (tok.bos_id, tok.eos_id)
    lc = llama_cpp()
    vocab = lc.llama_model_get_vocab(llm.model)
    assert all(lc.llama_vocab_is_eog(vocab, i) for i in stop_ids(tok))  # a reply ends at <|im_end|> and </s>


F32_KV = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32 for llama.cpp's KV cache (its default is f16)


# measured: f32 weights + f32 KV cache 2.4e-6 (the same model), default f16 KV cache 2.3e-3, f16 weights 4.5e-3
@pytest.mark.parametrize("dtype,kv,tol", [("f32", F32_KV, 1e-4), ("f32", {}, 1e-2), ("f16", {}, 1e-2)],
                         ids=["f32-f32kv", "f32", "f16"])
@pytest.mark.parametrize("tie", [True, False])
def test_greedy_continuation_and_logits_match(exported, dtype, kv, tol, tie):
    files, models, tok = exported
    llm = load(files[tie, dtype], **kv)
    for text in PROMPTS:
        prompt = tok.encode(text, bos=True)
        mine = our_greedy(models[tie], prompt, N_NEW)
        assert len(mine) == N_NEW and llama_cpp_greedy(llm, prompt, N_NEW) == mine, text
        ids = prompt + mine
        diff = np.abs(llama_cpp_logits(llm, ids) - our_logits(models[tie], ids)).max()
        assert diff <= tol, (text, diff)


def test_q8_0_agrees_on_most_greedy_tokens(exported):
    """8-bit weights move the logits by about 1% of their spread; the next-token argmax on our greedy
    sequences (teacher-forced, so one early flip does not decide the rest) must agree almost everywhere."""
    files, models, tok = exported
    llm, model = load(files[True, "q8_0"]), models[True]
    agree = total = 0
    for text in PROMPTS:
        prompt = tok.encode(text, bos=True)
        ids = prompt + our_greedy(model, prompt, N_NEW)
        theirs, mine = llama_cpp_logits(llm, ids), our_logits(model, ids)
        agree += int((theirs.argmax(-1) == mine.argmax(-1))[len(prompt) - 1:].sum())
        total += len(ids) - len(prompt) + 1
        assert np.abs(theirs - mine).max() <= 0.25 * np.ptp(mine)
    assert agree / total >= 0.9, f"q8_0 greedy agreement {agree}/{total}"


def test_chat_completion_with_the_files_template_equals_our_reply(exported):
    """The untied model: its random replies are varied (the tied one repeats one token), byte pieces included."""
    files, models, tok = exported
    llm = load(files[False, "f32"])
    assert llm.chat_format == "chat_template.default"  # the file's own template, not a guess from its name
    done = llm.create_chat_completion(MESSAGES, temperature=0.0, max_tokens=24)
    # llama-cpp-python goes past max_tokens while the text ends in an incomplete UTF-8 character: reply as long
    n = done["usage"]["completion_tokens"]
    assert n >= 24 and done["choices"][0]["finish_reason"] == "length"
    session = ChatSession(models[False], tok, SamplingConfig(max_new_tokens=n, temperature=0),
                          system=MESSAGES[0]["content"])  # what sft/infer.py --system ... --temperature 0 runs
    for m in MESSAGES[1:-1]:
        session.history.add(m["role"], m["content"])
    ours = session.reply(MESSAGES[-1]["content"], io.StringIO())
    assert len(set(ours)) > 5
    # bytes that form no UTF-8 character (random byte pieces) are U+FFFD in our text; llama-cpp-python drops them
    assert done["choices"][0]["message"]["content"] == ours.replace("\ufffd", "")


def test_llama_cpp_builds_our_chat_prompt(exported):
    """The two prompt builders of llama.cpp give the ids we train on: the file's Jinja template (llama-cpp-python,
    llama-server --jinja) and llama.cpp's built-in ChatML (llama-cli/llama-server without --jinja)."""
    files, _, tok = exported
    lc = llama_cpp()
    llm = load(files[True, "f32"], vocab_only=True)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    jinja = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    expected = render_prompt(MESSAGES, tok)
    assert llm.tokenize(jinja(messages=MESSAGES).prompt.encode(), add_bos=False, special=True) == expected
    chat = (lc.llama_chat_message * len(MESSAGES))(*[lc.llama_chat_message(m["role"].encode(), m["content"].encode())
                                                     for m in MESSAGES])
    template = lc.llama_model_chat_template(llm.model, None)
    buf = ctypes.create_string_buffer(4096)
    n = lc.llama_chat_apply_template(template, chat, len(MESSAGES), True, buf, len(buf))
    assert 0 < n < len(buf)
    assert llm.tokenize(buf.raw[:n], add_bos=True, special=True) == expected


# ======================================================================= bad input
def test_refuses_other_tokenizer_existing_output_and_hf_tokenizer(tmp_path, exported, other_tokenizer, tok_dir):  # noqa: F811
    _, models, tok = exported
    ckpt = tmp_path / "step_00000001.pt"
    atomic_save({"model": models[True].state_dict(), "model_config": models[True].config.to_dict(), "step": 1,
                 "extra": {"tokenizer": tok.fingerprint}}, ckpt)
    with pytest.raises(UserError, match="is not the one checkpoint .* was trained with"):
        export_gguf(ckpt, other_tokenizer, tmp_path / "a.gguf")
    with pytest.raises(UserError, match="a.gguf: already exists; pass --overwrite to replace it, or another --dest$"):
        (tmp_path / "a.gguf").write_bytes(b"mine")
        export_gguf(ckpt, tok_dir, tmp_path / "a.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == b"mine"
    assert export_gguf(ckpt, tok_dir, tmp_path / "a.gguf", overwrite=True).stat().st_size > 100_000
    with pytest.raises(UserError, match="tokenizer.json: GGUF export needs a SentencePiece tokenizer"):
        export_gguf(ckpt, tok_dir / "tokenizer.json", tmp_path / "b.gguf")
    with pytest.raises(UserError, match="--outtype 'q4_0': choose one of f32, f16, q8_0"):
        export_gguf(ckpt, tok_dir, tmp_path / "c.gguf", "q4_0")
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(UserError, match="d.gguf: is a directory; --dest names the .gguf file to write"):
        export_gguf(ckpt, tok_dir, tmp_path / "d.gguf", overwrite=True)
    # nothing but the outputs: no b/c file, no temp file of a write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.Modelfile", "a.gguf", "d.gguf", "step_00000001.pt"]


def test_cli_exports_a_stage_and_names_a_missing_one(tmp_path, exported, tok_dir):  # noqa: F811
    _, models, tok = exported
    run = tmp_path / "out" / "mini"
    atomic_save({"model": models[False].state_dict(), "model_config": models[False].config.to_dict(), "step": 3,
                 "extra": {"tokenizer": tok.fingerprint}}, run / "sft" / "step_00000003.pt")
    tok.save(run / "tokenizer")
    cli = [sys.executable, "-m", "babyllama", "export", "gguf", "--out", str(tmp_path / "out"), "--name", "mini",
           "--dest", str(tmp_path / "mini.gguf")]
    done = subprocess.run(cli + ["--stage", "sft", "--outtype", "f16"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fields = gguf.GGUFReader(tmp_path / "mini.gguf").fields
    assert fields["general.name"].contents() == "mini-sft"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    # --dtype: the old spelling (the inference jobs' --dtype is the runtime precision), still accepted
    again = subprocess.run(cli + ["--stage", "sft", "--dtype", "q8_0", "--overwrite"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert gguf.GGUFReader(tmp_path / "mini.gguf").fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q8_0
    helped = subprocess.run(cli[:5] + ["--help"], capture_output=True, text=True)
    assert "--outtype" in helped.stdout and "--dtype" not in helped.stdout
    missing = subprocess.run(cli + ["--stage", "dpo", "--overwrite"], capture_output=True, text=True)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "mini/dpo: no such checkpoint or stage directory; train that stage first" in missing.stderr
