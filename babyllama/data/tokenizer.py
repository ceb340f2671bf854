"""Tokenizers: train a zh+en byte-fallback BPE, load SentencePiece or Hugging Face tokenizers, stream-decode.

Training
--------
`train_tokenizer(texts, vocab_size, out_dir)` trains a SentencePiece BPE model and writes

- `tokenizer.model`: the SentencePiece model (the LLaMA format);
- `tokenizer.json`: the same tokenizer for Hugging Face `tokenizers`/`transformers` (encodes identically);
- `tokenizer_config.json`: the special tokens (`PreTrainedTokenizerFast`, so `AutoTokenizer` loads the directory).

A non-empty `out_dir` is refused unless `overwrite=True` (`babyllama data tokenizer --overwrite`).

Ids 0-5 are fixed: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, `<|im_start|>`=4, `<|im_end|>`=5, then the 256 byte
pieces `<0x00>`..`<0xFF>` (byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, so nothing
is ever `<unk>`), then the learned pieces. Text round-trips exactly (identity normalization, no dummy prefix,
whitespace kept), except U+2581 "▁", which SentencePiece uses for the space and decodes as " ". Digits are
always single tokens.

Why SentencePiece and not HF `tokenizers` for training: an SP BPE model converts exactly to an HF BPE (the merges
are derived from the piece scores, which is how HF itself converts LLaMA), while an HF-trained BPE is not replayed
exactly by SentencePiece (it merges by piece score, HF by merge rank); SP also has character coverage and byte
fallback built in, and it is fast enough (4096 tokens on the shipped 1.3M-character corpus: under 1 s on 2 cores;
64,793 tokens on 20M characters: ~20 s and ~1.6 GB of RAM).

Characters: SentencePiece keeps the most frequent characters covering `character_coverage` of the text as
single pieces; with Chinese that can be thousands (the shipped poetry needs 4,853 for 99.95%). When those would
take more than `char_vocab_fraction` of the learnable vocabulary, only the most frequent characters that fit are
kept and the training text is split at the others (SentencePiece cannot lower the coverage below 0.98); rarer
characters then cost their 3 UTF-8 byte tokens each (4096 on the shipped corpus keeps 2,556 characters).

Corpus size: texts are cut into pieces of at most `max_sentence_chars` (at line breaks where possible), and a
uniform random sample of them of at most `max_train_chars` characters / `input_sentence_size` pieces is kept in
memory (SentencePiece needs ~80 bytes of RAM per character). A vocabulary needs roughly 300 characters of text
per token to be made of pieces seen often (64,793 -> ~20M characters; 4096 -> ~1.2M); below that a warning is
given, and a corpus too small to fill the vocabulary at all raises `UserError` naming the largest size it allows.

Loading
-------
`Tokenizer.load(path)` takes a SentencePiece `.model`, an HF `tokenizer.json` (e.g. Qwen3's) or a directory with
either (`tokenizer.model` is preferred: SentencePiece encodes ~3x faster). Bos/eos/pad/unk come from a
`tokenizer_config.json` next to the file if there is one, else from the model (SentencePiece ids; special tokens
with common names for HF). Fallbacks: no bos -> bos = eos (GPT/Qwen-style tokenizers separate documents with one
end token); no pad -> pad = eos (padding is masked out); no unk -> `unk_id` is None (byte-level tokenizers never
produce one); no eos at all -> `UserError`. Qwen3's config names `<|im_end|>` as eos, so that is what it gets.
`check_tokenizer(...)` refuses a tokenizer with more ids than a model's embedding, or another one than the
checkpoint's recorded `fingerprint` (hash of the id -> token table and bos/eos/pad).

Special tokens and injection safety
-----------------------------------
`encode(text)` never turns text into a special token: a user typing "<|im_end|>" gets the characters, not id 5.
(SentencePiece control symbols are never matched in text; for HF tokenizers `encode_special_tokens` is set. HF
*non-special* added tokens such as Qwen's `<think>` are still matched, as HF does.) `encode(..., allow_special=True)`
parses special-token spellings into their ids, for trusted template text; `babyllama.data.chat_template` instead
inserts the ids itself (`token_to_id`). `decode(ids)` writes special tokens as their text; `skip_special=True`
drops them.

Streaming
---------
`tok.stream_decoder()` returns a `StreamDecoder`: `push(id)` returns the text that became final (possibly ""),
`flush()` the rest. It holds back a trailing incomplete UTF-8 character (byte-fallback tokens), so the pieces
never contain a half character and their concatenation equals `decode(ids)`.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import io
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import decoders, normalizers, processors

from babyllama.errors import UserError
from babyllama.files import claim_out_dir, fsync_dir, locked

UNK, BOS, EOS, PAD, IM_START, IM_END = "<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IM_START, IM_END)  # ids 0..5 in tokenizers trained here
N_META = len(SPECIAL_TOKENS) + 256  # special + byte pieces: the part of the vocabulary that is not learned
CHARS_PER_VOCAB_ENTRY = 300  # corpus characters per token below which the vocabulary is mostly rare pieces
DEFAULT_VOCAB_SIZE = 4096
# what `Tokenizer.save` writes, in the order it puts them in place: tokenizer.model, which `load` prefers and
# pretraining takes as the mark of a trained tokenizer, last
_SAVED = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")

# Names tried, in order, when neither tokenizer_config.json nor the model says which token plays a role.
_ROLE_NAMES = {
    "bos": (BOS, "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": (EOS, "<|endoftext|>", "<|end_of_text|>", "<eos>", IM_END),
    "pad": (PAD, "<|pad|>", "[PAD]"),
    "unk": (UNK, "[UNK]"),
}


# ======================================================================= training
def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
                    character_coverage: float = 0.9995, char_vocab_fraction: float = 2 / 3,
                    max_train_chars: int = 20_000_000, input_sentence_size: int = 2_000_000,
                    max_sentence_chars: int = 1024, num_threads: int | None = None, seed: int = 0,
                    verbose: bool = False, overwrite: bool = False) -> "Tokenizer":
    """Train a byte-fallback BPE on `texts` (documents) and write it to `out_dir`; see the module docstring.

    A non-empty `out_dir` is refused before training unless `overwrite` (data and checkpoints may have been built
    with the tokenizer there); the three tokenizer files are then replaced, anything else is left alone."""
    with locked(Path(out_dir), "tokenizer build"):  # a second build into this directory is refused
        claim_out_dir(Path(out_dir), overwrite, "tokenizer")
        if vocab_size < N_META + 16:
            raise UserError(f"vocab_size={vocab_size} is too small: {N_META} ids are special and byte tokens; "
                            f"use at least {N_META + 16} (e.g. {DEFAULT_VOCAB_SIZE})")
        sample = _sample_sentences(texts, max_train_chars, input_sentence_size, max_sentence_chars, seed)
        n_chars = sum(map(len, sample))
        if not n_chars:
            raise UserError("no text to train the tokenizer on; check the corpus path and its text field")
        if n_chars < CHARS_PER_VOCAB_ENTRY * vocab_size:
            warnings.warn(f"{n_chars:,} characters of text for a {vocab_size:,}-token vocabulary: many pieces will be "
                          f"rare; use about {CHARS_PER_VOCAB_ENTRY * vocab_size / 1e6:.1f}M characters or a smaller "
                          "vocabulary", UserWarning, stacklevel=2)
        sample, coverage = _limit_characters(sample, vocab_size - N_META, character_coverage, char_vocab_fraction)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_drain(sample), model_writer=model, model_type="bpe", vocab_size=vocab_size,
                character_coverage=coverage, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=False,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
                control_symbols=[IM_START, IM_END], input_sentence_size=0,
                max_sentence_length=4 * max_sentence_chars + 4,
                num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2)
        except RuntimeError as e:
            raise _training_error(e, vocab_size, n_chars) from None
        tok = Tokenizer._from_spm(model.getvalue(), Path(out_dir) / "tokenizer.model", {})
        tok.save(out_dir)
        return tok


def _sample_sentences(texts: Iterable[str], max_chars: int, max_sentences: int, max_len: int,
                      seed: int) -> list[str]:
    """A uniform random sample of the texts' chunks within both budgets, in corpus order (one pass, bounded memory)."""
    rng, heap, total = random.Random(seed), [], 0
    for i, chunk in enumerate(c for text in texts for c in _chunks(text, max_len)):
        heapq.heappush(heap, (rng.random(), i, chunk))  # keep the chunks with the largest random keys
        total += len(chunk)
        while total > max_chars or len(heap) > max_sentences:
            total -= len(heapq.heappop(heap)[2])
    return [chunk for _, _, chunk in sorted(heap, key=lambda item: item[1])]


def _chunks(text: str, max_len: int) -> Iterator[str]:
    """`text` in pieces of at most `max_len` characters, cut after a newline where possible (SentencePiece
    silently drops longer sentences)."""
    start = 0
    while start < len(text):
        end = start + max_len
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def _drain(items: list[str]) -> Iterator[str]:
    """Yield and release the items, so the sample is not held twice while SentencePiece copies it."""
    items.reverse()
    while items:
        yield items.pop()


def _limit_characters(sample: list[str], learnable: int, coverage: float,
                      char_fraction: float) -> tuple[list[str], float]:
    """The sample and the coverage to train with, so that single characters take at most `char_fraction` of the
    learnable vocabulary. SentencePiece refuses coverages below 0.98, so instead of lowering the coverage the text
    is split at the rarer characters: no piece spans them, as none can at encoding time (they become bytes)."""
    counts = Counter()
    for s in sample:
        counts.update(s)
    ranked = [c for c, _ in counts.most_common()]
    budget, total, covered = int(learnable * char_fraction), counts.total(), 0
    for needed, c in enumerate(ranked, 1):
        covered += counts[c]
        if covered >= coverage * total or needed > budget:
            break
    if needed <= budget:
        return sample, coverage
    rare = re.compile("[" + "".join(map(re.escape, ranked[budget:])) + "]+")
    return [part for s in sample for part in rare.split(s) if part], 1.0


def _training_error(e: RuntimeError, vocab_size: int, n_chars: int) -> UserError:
    msg = str(e)
    most = re.search(r"value <= (\d+)", msg)
    if most:
        return UserError(f"the corpus is too small for vocab_size={vocab_size:,}: its {n_chars:,} characters fill at "
                         f"most {int(most[1]):,} tokens; give more text (about "
                         f"{CHARS_PER_VOCAB_ENTRY * vocab_size / 1e6:.1f}M characters for {vocab_size:,}) "
                         f"or use a vocab size of at most {most[1]}")
    return UserError(f"tokenizer training failed: {msg.split('] ')[-1].strip() or msg}")


# ======================================================================= the tokenizer
class Tokenizer:
    """A SentencePiece or Hugging Face tokenizer behind one interface; build it with `load` or `train_tokenizer`."""

    def __init__(self, backend: "_SentencePiece | _HuggingFace", config: dict[str, Any], source: Path):
        self._backend, self.source = backend, source
        self._special = backend.special_tokens()  # content -> id
        self._special_text = {i: t for t, i in self._special.items()}
        longest_first = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")  # (?!) never matches
        roles = {role: self._role_id(role, config) for role in _ROLE_NAMES}
        if roles["eos"] is None:
            raise UserError(f"{source}: the tokenizer has no end-of-sequence token; set eos_token in a "
                            "tokenizer_config.json next to it")
        self._bos = roles["bos"] if roles["bos"] is not None else roles["eos"]
        self._pad = roles["pad"] if roles["pad"] is not None else roles["eos"]
        self._eos, self._unk = roles["eos"], roles["unk"]

    # ---- construction
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a SentencePiece `.model`, an HF `tokenizer.json`, or a directory holding either."""
        p = Path(path)
        if p.is_dir():
            found = [p / n for n in ("tokenizer.model", "tokenizer.json") if (p / n).is_file()]
            if not found:
                raise UserError(f"{p}: no tokenizer.model or tokenizer.json in this directory; train one with "
                                f"`babyllama data tokenizer --dest {p}` or pass the tokenizer file")
            p = found[0]
        if not p.is_file():
            raise UserError(f"{p}: tokenizer not found; pass a tokenizer.model, a tokenizer.json or their directory")
        config = _read_config(p.parent / "tokenizer_config.json")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise UserError(f"{p}: cannot read the tokenizer ({e.strerror or e})") from None
        if p.suffix == ".json" or (p.suffix != ".model" and data.lstrip()[:1] == b"{"):
            return cls._from_hf(data, p, config)
        return cls._from_spm(data, p, config)

    @classmethod
    def _from_spm(cls, data: bytes, source: Path, config: dict[str, Any]) -> "Tokenizer":
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise UserError(f"{source}: not a SentencePiece model or corrupt ({str(e)[:120]}); pass a "
                            "tokenizer.model or tokenizer.json, or retrain with `babyllama data tokenizer`") from None
        return cls(_SentencePiece(sp, data), config, source)

    @classmethod
    def _from_hf(cls, data: bytes, source: Path, config: dict[str, Any]) -> "Tokenizer":
        try:
            hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # invalid JSON, not UTF-8, or JSON that is not a tokenizer
            raise UserError(f"{source}: not a Hugging Face tokenizer.json or corrupt ({str(e)[:120]}); pass the "
                            "tokenizer.json of a model (not its config.json) or a SentencePiece .model") from None
        return cls(_HuggingFace(hf), config, source)

    def _role_id(self, role: str, config: dict[str, Any]) -> int | None:
        named = _token_content(config.get(f"{role}_token"))
        candidates = ([self.token_to_id(named)] if named else []) + [self._backend.native_id(role)]
        candidates += [self._special.get(name) for name in _ROLE_NAMES[role]]  # a plain "<s>" in a vocab is text
        return next((c for c in candidates if c is not None), None)

    # ---- properties
    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special/control tokens, text -> id (never produced from text unless `allow_special=True`)."""
        return dict(self._special)

    @property
    def sentencepiece_model(self) -> bytes | None:
        """The serialized SentencePiece model (what exports such as GGUF read), None for a Hugging Face tokenizer."""
        return getattr(self._backend, "data", None)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the id -> token table and the bos/eos/pad ids: what a model trained on these ids depends on.
        Checkpoints record it, so that a retrained or other tokenizer is refused instead of decoding nonsense."""
        table = [self.id_to_token(i) for i in range(self.vocab_size)] + [self._bos, self._eos, self._pad]
        return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()[:16]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self._backend.id_to_token(i)

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id stands for (a byte-fallback or byte-level piece may be part of a character;
        a special token: its spelling): what per-token log-probabilities report and grammars match against."""
        return [self._backend.token_bytes(i) for i in range(self.vocab_size)]

    # ---- encoding
    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token spellings are plain text unless `allow_special`."""
        ids = self._encode_with_special(text) if allow_special else self._backend.encode_one(text)
        return ([self._bos] if bos else []) + ids + ([self._eos] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (multi-threaded in the backend: the fast path for data preparation)."""
        if allow_special:
            batch = [self._encode_with_special(t) for t in texts]
        else:
            batch = self._backend.encode_batch(list(texts))
        head, tail = [self._bos] if bos else [], [self._eos] if eos else []
        return [head + ids + tail for ids in batch] if bos or eos else batch

    def _encode_with_special(self, text: str) -> list[int]:
        parts, specials = self._special_re.split(text), self._special_re.findall(text)
        ids = self._backend.encode_one(parts[0])
        for special, part in zip(specials, parts[1:]):
            ids += [self._special[special]] + self._backend.encode_one(part)
        return ids

    # ---- decoding
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens are written as their text, or dropped with `skip_special`."""
        ids = [int(i) for i in ids]
        if self._special_text.keys().isdisjoint(ids):
            return self._backend.decode(ids)
        out, run = [], []
        for i in ids:
            if i not in self._special_text:
                run.append(i)
                continue
            out.append(self._backend.decode(run))
            run = []
            if not skip_special:
                out.append(self._special_text[i])
        return "".join(out) + self._backend.decode(run)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        """An incremental decoder for printing ids as they are generated."""
        return StreamDecoder(self, skip_special)

    # ---- saving
    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.model (SentencePiece only), tokenizer.json and tokenizer_config.json to `out_dir`, all or
        none: they are written into a temp directory there, then renamed into place (a failed write, e.g. a full
        disk, leaves the files already there as they were)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tokenizer.", suffix=".tmp"))
        try:
            self._backend.save(tmp)
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                      "bos_token": self.id_to_token(self._bos), "eos_token": self.id_to_token(self._eos),
                      "pad_token": self.id_to_token(self._pad),
                      "unk_token": self.id_to_token(self._unk) if self._unk is not None else None,
                      "additional_special_tokens": [t for t, i in self._special.items()
                                                    if i not in (self._bos, self._eos, self._pad, self._unk)]}
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                       encoding="utf-8")
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):  # name the file meant, not the temp one (a write names none)
                e.filename = str(out / Path(e.filename).name) if e.filename else str(out)
            raise
        for name in _SAVED:
            if (tmp / name).exists():
                os.replace(tmp / name, out / name)
            else:  # a stale file of another tokenizer (`load(out)` prefers tokenizer.model)
                (out / name).unlink(missing_ok=True)
        tmp.rmdir()
        fsync_dir(out)

    def __repr__(self) -> str:
        return f"Tokenizer({self._backend.kind}, vocab_size={self.vocab_size}, source={str(self.source)!r})"


def check_tokenizer(tok: Tokenizer, model_vocab_size: int, trained_with: str | None, checkpoint: str | Path) -> None:
    """Refuse a tokenizer whose ids the model has no embedding for (they would fail deep inside the model), or
    that is not the one the checkpoint was trained with (`trained_with`: its recorded fingerprint, None for
    checkpoints from before the record was kept)."""
    fix = "pass the tokenizer the model was trained with (--tokenizer)"
    if tok.vocab_size > model_vocab_size:
        raise UserError(f"tokenizer {tok.source} has {tok.vocab_size:,} tokens but the checkpoint {checkpoint} has "
                        f"vocab_size {model_vocab_size:,}; {fix}")
    if trained_with is not None and trained_with != tok.fingerprint:
        raise UserError(f"tokenizer {tok.source} is not the one checkpoint {checkpoint} was trained with "
                        f"(fingerprint {tok.fingerprint}, trained with {trained_with}; was it retrained?); {fix}")


class StreamDecoder:
    """Turns ids arriving one by one into text pieces that never end in a half-decoded UTF-8 character.

    Each `push` decodes the ids since the last emitted group (kept as context, so tokenizers that drop a leading
    space at the start of a text decode consistently) and emits what is new, unless it ends in U+FFFD, the mark of
    an incomplete byte sequence, which is held until more bytes arrive or `flush` is called.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok, self._skip = tokenizer, skip_special
        self._ids: list[int] = []  # the last emitted group (context) followed by pending ids
        self._emitted = 0  # how many of `_ids` are context

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        prefix = self._tok.decode(self._ids[:self._emitted], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._emitted:]
        self._emitted = len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Return whatever is still held back (e.g. an unfinished byte sequence at the end) and reset."""
        prefix = self._tok.decode(self._ids[:self._emitted], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        self._ids, self._emitted = [], 0
        return text[len(prefix):]


# ======================================================================= backends
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as a printable character: itself when printable, else chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _gpt2_byte_alphabet()


class _SentencePiece:
    kind = "sentencepiece"

    def __init__(self, sp: spm.SentencePieceProcessor, data: bytes):
        self.sp, self.data = sp, data  # the serialized model (a parsed protobuf message would not pickle)
        self.vocab_size = sp.get_piece_size()

    def special_tokens(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def native_id(self, role: str) -> int | None:
        i = getattr(self.sp, f"{role}_id")()
        return i if i >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # unknown pieces map to the unk id

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def token_bytes(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):  # <0xNN>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def encode_one(self, text: str) -> list[int]:
        return self.sp.encode(text)  # the batch call costs ~80 us of thread-pool start-up

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def save(self, out: Path) -> None:
        (out / "tokenizer.model").write_bytes(self.data)
        hf = _hf_from_spm(sp_pb2.ModelProto.FromString(self.data))
        if hf is None:
            warnings.warn(f"{out}: only tokenizer.model written; tokenizer.json needs a SentencePiece BPE model "
                          "without normalization rules or remove_extra_whitespaces", UserWarning, stacklevel=3)
        else:
            _save_hf(hf, out / "tokenizer.json")


class _HuggingFace:
    kind = "huggingface"

    def __init__(self, hf: tokenizers.Tokenizer):
        hf.encode_special_tokens = True  # special-token spellings in text stay text (see module docstring)
        self.hf = hf
        self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1  # ids may have gaps

    def __reduce__(self) -> tuple:
        return _HuggingFace, (self.hf,)  # `encode_special_tokens` does not survive pickling: set it again

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def native_id(self, role: str) -> int | None:
        unk = getattr(self.hf.model, "unk_token", None)
        return self.hf.token_to_id(unk) if role == "unk" and unk else None

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        token = self.hf.id_to_token(i)
        if token is None:
            raise IndexError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
        return token

    def token_bytes(self, i: int) -> bytes:
        token = self.id_to_token(i)
        if i in self.hf.get_added_tokens_decoder():
            return token.encode()
        if _BYTE_PIECE.fullmatch(token):  # byte fallback
            return bytes([int(token[3:5], 16)])
        if self._byte_level:  # GPT-2's printable alphabet: one character per byte
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        return token.replace("\u2581", " ").encode()

    @functools.cached_property
    def _byte_level(self) -> bool:
        return "ByteLevel" in json.dumps(json.loads(self.hf.to_str()).get("decoder"))

    def encode_one(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def save(self, out: Path) -> None:
        _save_hf(self.hf, out / "tokenizer.json")  # encode_special_tokens is not saved: files keep HF's default


def _save_hf(hf: tokenizers.Tokenizer, path: Path) -> None:
    """`hf.save`, whose I/O errors are a bare Exception "... (os error N)", raising them as the OSError they are
    (a full disk or a file size limit is then one line, see cli.main_guard)."""
    try:
        hf.save(str(path))
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e


def _hf_from_spm(proto: sp_pb2.ModelProto) -> tokenizers.Tokenizer | None:
    """The HF equivalent of a SentencePiece BPE model with identity normalization, or None for other models.

    SentencePiece merges the adjacent pair whose concatenation is the highest-scoring piece; HF merges by rank.
    Listing every split of every piece into two pieces, ordered by the score of the result, makes them agree.
    """
    ns, spec, kind = proto.normalizer_spec, proto.trainer_spec, sp_pb2.ModelProto.SentencePiece
    if spec.model_type != sp_pb2.TrainerSpec.BPE or ns.precompiled_charsmap or ns.remove_extra_whitespaces:
        return None
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == kind.NORMAL}
    merges = sorted((mergeable[p], mergeable[p[:k]], mergeable[p[k:]], p[:k], p[k:])
                    for p in mergeable for k in range(1, len(p)) if p[:k] in mergeable and p[k:] in mergeable)
    unk = next(p.piece for p in pieces if p.type == kind.UNKNOWN)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk,
                                                    byte_fallback=spec.byte_fallback, fuse_unk=True))
    norm = [normalizers.Prepend("▁")] if ns.add_dummy_prefix else []
    norm += [normalizers.Replace(" ", "▁")] if ns.escape_whitespaces else []
    hf.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " ")] if ns.escape_whitespaces else []
    dec += [decoders.ByteFallback(), decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else [])
    hf.decoder = decoders.Sequence(dec)
    hf.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False) for p in pieces
                           if p.type in (kind.CONTROL, kind.UNKNOWN)])
    hf.add_tokens([tokenizers.AddedToken(p.piece, normalized=False) for p in pieces if p.type == kind.USER_DEFINED])
    if spec.bos_id >= 0:  # like LLaMA: `<s>` first when HF tools encode with add_special_tokens
        bos = spec.bos_piece
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, spec.bos_id)])
    return hf


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e}); fix or delete it") from None
    return config if isinstance(config, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} or null."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None
