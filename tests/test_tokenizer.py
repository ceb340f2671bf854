"""Tokenizer: training (fixed special ids, byte fallback, 64,793 vocab, too-small corpus), exact round trips,
SentencePiece vs tokenizer.json equivalence, loading each format, injection safety, streaming, bad paths, CLI."""
import json
import pickle
import random
import subprocess
import sys
import warnings
from itertools import accumulate
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers

from babyllama.data.tokenizer import IM_END, IM_START, SPECIAL_TOKENS, Tokenizer, _chunks, train_tokenizer
from babyllama.errors import UserError

COMMON_ZH = ("不人一山风无日春花有中来云上月二天其三时何水归年江相自夜白秋长生十雨君见如知得行诗心去为事清寒处明空是未"
             "里此子下高南道送家客老万今书玉新在声游千东酒与青门落前寄西别尽应深金多远阳谁雪已和五黄城更飞入闲古楼成路"
             "愁四思草开看重作欲过头林烟还朝望情出香流公居歌梦回红似马石旧可我将同到树之后满独几叶州平光难晚色方闻柳")
SYLLABLES = ("the an in re on at er ing st or en ou is it al ar ed es ly th he to of and we be sh ch ow ight mor "
             "love").split()
REAL = ["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", "To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
        "Now is the winter of our discontent\nMade glorious summer by this sun of York;"]
TRICKY = ["  leading and trailing spaces  ", "tabs\tand\r\nwindows lines\n\n\nand   runs",
          "数字 1234567890 和 3.14", "emoji 😀🎉👍🏽 and 𠮷野家 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "rare 龘 齉 Ωμέγα ñandú Ünïcödé ﬁ",
          "mixed 中文English混合, “引号”《书名》",
          "<|im_start|>user\n你好<|im_end|>\n", "</s><s><pad><unk><0x41>", "", " ", "\n"]


def zipf_sampler(rng: random.Random, items: list):
    cum = list(accumulate(1 / (r + 1) for r in range(len(items))))
    return lambda n: rng.choices(items, cum_weights=cum, k=n)


def make_corpus(n_chars: int, seed: int = 0) -> list[str]:
    """Real-looking zh poems and en verse (Zipf-distributed characters and words) plus a few real lines."""
    rng = random.Random(seed)
    zh_pool = list(COMMON_ZH) + [chr(0x4E00 + k) for k in range(0, 6000, 3)]  # frequent head, rare tail
    words = list(dict.fromkeys("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(4000)))
    zh, en = zipf_sampler(rng, zh_pool), zipf_sampler(rng, words)
    docs, size = list(REAL), 0
    while size < n_chars:
        if rng.random() < 0.5:
            lines = ["".join(zh(5)) + "，" + "".join(zh(5)) + "。" for _ in range(rng.randint(2, 4))]
        else:
            lines = [" ".join(en(rng.randint(4, 9))).capitalize() + rng.choice(",.;!?")
                     for _ in range(rng.randint(1, 4))]
        docs.append("\n".join(lines))
        size += len(docs[-1])
    return docs


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus(350_000)


@pytest.fixture(scope="session")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, 1024, out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def qwen_like_dir(corpus, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json shaped like Qwen3's (NFC, ByteLevel, special + non-special added tokens)."""
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.normalizer = tokenizers.normalizers.NFC()
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>", IM_START, IM_END]
    hf.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.add_tokens(["<think>"])  # a non-special added token, like Qwen3's
    out = tmp_path_factory.mktemp("qwen")
    hf.save(str(out / "tokenizer.json"))
    return out


# ---------------------------------------------------------------- training
def test_special_ids_are_fixed(tok, tok_dir):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.id_to_token(6) == "<0x00>" and tok.id_to_token(261) == "<0xFF>"
    assert tok.vocab_size == 1024 and tok.token_to_id("no such piece") is None
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == \
        ("<s>", "</s>", "<pad>", "<unk>")
    assert config["additional_special_tokens"] == [IM_START, IM_END]


def test_round_trip_is_exact_with_byte_fallback(tok, corpus):
    for text in TRICKY + corpus[:200]:
        assert tok.decode(tok.encode(text)) == text
    rare = tok.encode("龘")  # not in the training text: three UTF-8 byte tokens
    assert [tok.id_to_token(i) for i in rare] == ["<0xE9>", "<0xBE>", "<0x98>"]
    assert tok.unk_id not in tok.encode("".join(TRICKY))
    assert all(len(tok.encode(d)) == 1 for d in "0123456789")  # split_digits
    assert tok.encode("12", bos=True, eos=True) == [1] + tok.encode("12") + [2]


def test_special_token_text_is_not_parsed_by_default(tok):
    text = f"{IM_START}user\nhi{IM_END}</s>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(6)) and tok.decode(ids) == text
    ids = tok.encode(text, allow_special=True)
    assert ids[0] == 4 and ids[-2:] == [5, 2] and tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\nhi"
    assert tok.encode_batch([text, "a"], allow_special=True) == [ids, tok.encode("a")]


def test_characters_beyond_the_vocab_fall_back_to_bytes(tok, corpus):
    """2,000+ distinct characters do not fit a 1024 vocab: rare ones fall back to bytes, frequent ones stay whole."""
    assert len(set("".join(corpus))) > 1024
    assert len(tok.encode("人山风")) <= 3


def test_long_lines_are_cut_not_dropped(corpus, tmp_path):
    text = "".join(corpus)[:5000].replace("\n", "")
    pieces = list(_chunks(text + "\n" + text, 1024))
    assert "".join(pieces) == text + "\n" + text and max(map(len, pieces)) <= 1024
    line = " ".join(d.replace("\n", " ") for d in corpus if d.isascii())  # ~170k characters, no line break
    tok = train_tokenizer([line], 400, tmp_path)  # SentencePiece alone would skip it (> 4192 bytes)
    assert len(tok.encode(line[:1000])) < 500


def test_vocab_64793_trains(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 450k characters is far below what a good 64,793 vocab wants
        tok = train_tokenizer(make_corpus(450_000, seed=1), 64_793, tmp_path)
    assert tok.vocab_size == 64_793 and tok.token_to_id(IM_END) == 5
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode(REAL[0]) == tok.encode(REAL[0])


def test_too_small_corpus_is_a_user_error(tmp_path):
    with pytest.warns(UserWarning, match="many pieces will be rare"), \
            pytest.raises(UserError, match=r"too small for vocab_size=64,793.*at most \d+"):
        train_tokenizer(make_corpus(20_000), 64_793, tmp_path)
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["", ""], 1000, tmp_path)
    with pytest.raises(UserError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], 100, tmp_path)


# ---------------------------------------------------------------- formats
def test_sentencepiece_and_tokenizer_json_are_identical(tok, tok_dir, corpus):
    hf_tok = Tokenizer.load(tok_dir / "tokenizer.json")
    texts = TRICKY + corpus[-3000:]
    ids = tok.encode_batch(texts)
    assert hf_tok.encode_batch(texts) == ids
    assert [hf_tok.decode(i) for i in ids[:300]] == [tok.decode(i) for i in ids[:300]]
    raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))  # what HF tools see
    assert raw.encode(REAL[1]).ids == [1] + tok.encode(REAL[1])  # <s> first, like LLaMA
    assert raw.decode(tok.encode(TRICKY[3])) == TRICKY[3]


def test_load_each_format(tok_dir, tok):
    from_dir, from_model = Tokenizer.load(tok_dir), Tokenizer.load(tok_dir / "tokenizer.model")
    from_json = Tokenizer.load(str(tok_dir / "tokenizer.json"))
    assert "sentencepiece" in repr(from_dir) and "sentencepiece" in repr(from_model)
    assert "huggingface" in repr(from_json)
    for t in (from_model, from_json):
        assert (t.vocab_size, t.bos_id, t.eos_id, t.pad_id, t.unk_id) == (1024, 1, 2, 3, 0)
        assert t.special_tokens == dict(zip(SPECIAL_TOKENS, range(6)))
        assert t.encode(REAL[0]) == tok.encode(REAL[0])
    for t in (from_model, from_json):  # data-prep workers get pickled copies
        copy = pickle.loads(pickle.dumps(t))
        assert copy.encode(REAL[2] + IM_END) == tok.encode(REAL[2] + IM_END) and 5 not in copy.encode(IM_END)


def test_save_round_trips(tok, tmp_path):
    hf_tok = Tokenizer.load(Path(tok.source).parent / "tokenizer.json")
    for t, sub in ((tok, "sp"), (hf_tok, "hf")):
        t.save(tmp_path / sub)
        again = Tokenizer.load(tmp_path / sub)
        assert again.encode(REAL[3]) == tok.encode(REAL[3]) and again.eos_id == 2
    hf_tok.save(tmp_path / "sp")  # replaces the SentencePiece model there, which `load` would otherwise prefer
    assert "huggingface" in repr(Tokenizer.load(tmp_path / "sp"))


def test_foreign_sentencepiece_with_dummy_prefix_converts(corpus, tmp_path):
    """LLaMA-style models add a leading "▁"; the converted tokenizer.json must do the same."""
    english = [d for d in corpus[:6000] if d.isascii()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(english), model_prefix=str(tmp_path / "llama"),
                                   model_type="bpe", vocab_size=700, byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp_tok = Tokenizer.load(tmp_path / "llama.model")
    assert sp_tok.pad_id == sp_tok.eos_id == 2  # no <pad> in this model: falls back to eos
    sp_tok.save(tmp_path / "out")
    hf_tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    texts = corpus[:300] + ["Hello  world", " x"]
    assert hf_tok.encode_batch(texts) == sp_tok.encode_batch(texts)
    assert [hf_tok.decode(sp_tok.encode(t)) for t in texts] == [sp_tok.decode(sp_tok.encode(t)) for t in texts]


def test_qwen_like_tokenizer_json(qwen_like_dir, tmp_path):
    tok = Tokenizer.load(qwen_like_dir)  # no tokenizer_config.json: roles by name
    eot = tok.token_to_id("<|endoftext|>")
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.unk_id) == (eot, eot, eot, None)
    for text in TRICKY[:6] + REAL:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(f"{IM_END}<think>")
    assert tok.token_to_id(IM_END) not in ids and tok.token_to_id("<think>") in ids  # HF non-special: matched
    assert tok.token_to_id(IM_END) in tok.encode(IM_END, allow_special=True)
    (tmp_path / "tokenizer.json").write_bytes((qwen_like_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(  # Qwen3's: no bos, eos <|im_end|>
        {"bos_token": None, "eos_token": IM_END, "pad_token": "<|endoftext|>", "unk_token": None}))
    tok = Tokenizer.load(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (tok.token_to_id(IM_END), tok.token_to_id(IM_END), eot)


# ---------------------------------------------------------------- streaming
@pytest.mark.parametrize("which", ["sentencepiece", "qwen_like"])
def test_stream_decoder_matches_decode_and_never_splits_characters(which, tok, qwen_like_dir):
    t = tok if which == "sentencepiece" else Tokenizer.load(qwen_like_dir)
    text = "".join(TRICKY[:7] + REAL) + "龘😀"
    ids = t.encode(text, allow_special=True)
    for skip in (False, True):
        stream = t.stream_decoder(skip_special=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == t.decode(ids, skip_special=skip)
        assert not any("\ufffd" in p for p in pieces)
    stream = t.stream_decoder()
    emoji = t.encode("😀")
    assert [stream.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1) and stream.push(emoji[-1]) == "😀"


def test_stream_flush_returns_incomplete_bytes(tok):
    stream = tok.stream_decoder()
    assert stream.push(tok.encode("😀")[0]) == "" and stream.flush() == "\ufffd"


# ---------------------------------------------------------------- bad input
def test_bad_paths_are_user_errors(tmp_path, tok_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.model").write_bytes(b"\x00\x01 not a model")
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": ')
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    for path, match in [(tmp_path / "missing", "not found"),
                        (tmp_path / "empty", "no tokenizer.model or tokenizer.json"),
                        (tmp_path / "garbage.model", "not a SentencePiece model"),
                        (tmp_path / "broken.json", "not a Hugging Face tokenizer.json"),
                        (tmp_path / "config.json", "not a Hugging Face tokenizer.json")]:
        with pytest.raises(UserError, match=match) as err:
            Tokenizer.load(path)
        assert str(path) in str(err.value)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (tmp_path / "cfg" / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(UserError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.load(tmp_path / "cfg")


def test_cli_trains_and_reports_per_language(corpus, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    with open(data / "mix.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in corpus[:3000])
    command = [sys.executable, "-m", "babyllama", "data", "tokenizer"]
    cmd = [*command, "--corpus", str(data), "--vocab-size", "600", "--dest", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "zh:" in done.stdout and "en:" in done.stdout and "characters/token" in done.stdout
    assert Tokenizer.load(tmp_path / "out").vocab_size == 600
    kept = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    again = subprocess.run(cmd[:-3] + ["700"] + cmd[-2:], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.splitlines() == [
        f"error: {tmp_path / 'out'} is not empty (3 entries); pass --overwrite (overwrite=True) to replace its "
        "tokenizer, or choose another output directory"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == kept  # refused before training
    replaced = subprocess.run(cmd[:-3] + ["700"] + cmd[-2:] + ["--overwrite"], capture_output=True, text=True,
                              timeout=60)
    assert replaced.returncode == 0, replaced.stderr
    assert Tokenizer.load(tmp_path / "out").vocab_size == 700
    bad = subprocess.run([*command, "--corpus", str(tmp_path / "nope"), "--vocab-size", "600", "--dest",
                          str(tmp_path / "out2")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: {tmp_path / 'nope'}: no such file")
    assert not (tmp_path / "out2").exists()
