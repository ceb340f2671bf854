"""Export a babyllama checkpoint to one GGUF file that llama.cpp (and ollama, LM Studio, ...) runs as it is.

    export_gguf("out/baby/sft", "out/baby/tokenizer", "baby-sft.gguf", outtype="q8_0")

The file holds what llama.cpp needs to run the model without any other file:

- architecture `llama`: sizes, context length, rope_theta, RMSNorm eps, file type;
- the weights under llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ...), the embedding and lm_head cut to
  the tokenizer's ids (`convert.weights.unpadded`); `output.weight` left out when tied (llama.cpp then reuses
  `token_embd`). q/k rows are permuted from HF's rotate-half RoPE layout (ours) to llama.cpp's interleaved pairs,
  as llama.cpp's own `convert_hf_to_gguf.py` does for every HF LLaMA;
- the SentencePiece vocabulary (`tokenizer.ggml.model = llama`): every piece with its score and type (normal,
  unknown, control, byte: `<0x00>`..`<0xFF>` for byte fallback), bos/eos/unk/pad ids, `add_space_prefix` from the
  model's `add_dummy_prefix`, `<|im_end|>` as the end-of-turn token (llama.cpp stops a reply there);
- the ChatML chat template of `babyllama.data.chat_template` (Jinja, as in the HF export), so llama.cpp's chat
  endpoints build exactly the prompt babyllama was trained on.

Weight types (`outtype`; --outtype, as in llama.cpp's convert_hf_to_gguf.py): `f32` (exact), `f16`, `q8_0` (8-bit
blocks of 32 with one f16 scale; matrices whose rows are not a multiple of 32 stay f16, as in llama.cpp's
converter). Norm weights stay f32 in every case.

Beside the file, `<stem>.Modelfile` lets ollama import it (`ollama create NAME -f baby-sft.Modelfile`): the same
template in ollama's Go syntax, the stop tokens and babyllama's default sampling parameters.

Only SentencePiece BPE tokenizers export: llama.cpp tokenizes a Hugging Face byte-level BPE with a pre-tokenizer
regex it picks from a list of known models, which a tokenizer.json of ours would not be in (refused with a message).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import gguf
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from torch import Tensor

from babyllama.convert.hf import CHAT_TEMPLATE
from babyllama.convert.weights import unpadded
from babyllama.data.chat_template import IM_END, IM_START
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.files import atomic_file, write_atomic
from babyllama.hardware import cpu_has_amx
from babyllama.model.config import ModelConfig
from babyllama.model.generate import SamplingConfig
from babyllama.train.checkpoint import load_model

DTypeName = Literal["f32", "f16", "q8_0"]
DTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
_PIECE_TYPES = {  # SentencePiece piece type -> GGUF token type
    sp_pb2.ModelProto.SentencePiece.NORMAL: gguf.TokenType.NORMAL,
    sp_pb2.ModelProto.SentencePiece.UNKNOWN: gguf.TokenType.UNKNOWN,
    sp_pb2.ModelProto.SentencePiece.CONTROL: gguf.TokenType.CONTROL,
    sp_pb2.ModelProto.SentencePiece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
    sp_pb2.ModelProto.SentencePiece.UNUSED: gguf.TokenType.UNUSED,
    sp_pb2.ModelProto.SentencePiece.BYTE: gguf.TokenType.BYTE,
}


def export_gguf(checkpoint: str | Path, tokenizer: str | Path, out: str | Path, outtype: DTypeName = "f32",
                overwrite: bool = False, name: str | None = None) -> Path:
    """Write `out` (a .gguf file) and `<stem>.Modelfile` beside it for a babyllama checkpoint; see the module
    docstring. An existing output is refused unless `overwrite`; each file is written beside its place and renamed
    there when complete (`files.atomic_file`), the .gguf last, so a failed write leaves the old pair."""
    out = Path(out)
    if outtype not in DTYPES:
        raise UserError(f"--outtype {outtype!r}: choose one of {', '.join(DTYPES)}")
    modelfile = modelfile_path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --dest names the .gguf file to write")
    existing = [p for p in (out, modelfile) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: already exists; pass --overwrite to replace it, or another --dest")
    if not Path(checkpoint).exists():
        raise UserError(f"{checkpoint}: no such checkpoint or stage directory; train that stage first, or pass "
                        "--ckpt (a step_*.pt file or a stage directory)")
    tok = Tokenizer.load(tokenizer)
    proto = sentencepiece_proto(tok)
    model = load_model(checkpoint, tokenizer=tok)  # refuses a checkpoint trained with another tokenizer
    cfg, weights = unpadded(model)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_llama_metadata(writer, cfg, name or out.stem, DTYPES[outtype][0])
    _add_vocab(writer, tok, proto)
    _add_tensors(writer, cfg, weights, DTYPES[outtype][1])
    stops = [tok.id_to_token(i) for i in dict.fromkeys((tok.token_to_id(IM_END), tok.eos_id)) if i is not None]
    with atomic_file(out) as f:
        try:
            writer.write_header_to_file(Path(f.name))  # the writer opens the temp file by name; f fsyncs it
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        # once the .gguf is complete, before it is renamed into place: a refused Modelfile keeps the old .gguf
        write_atomic(modelfile, ollama_modelfile(out, cfg.max_seq_len, stops).encode("utf-8"))
    return out


def open_in_llama_cpp(path: str | Path, **kwargs):
    """The file in llama.cpp itself (llama-cpp-python's `Llama`, `kwargs` its options), the consumer every export is
    checked against. On a CPU with AMX, llama.cpp's extra buffer types (weights repacked for AMX) are turned off:
    decoding a q8_0 file with them crashed (segfault in its AMX matrix product; llama-cpp-python 0.3.36 built with
    -march=native on an Intel Xeon with AMX, 2026-12-06), a known llama.cpp bug (ggml-org/llama.cpp#20824)."""
    import llama_cpp

    if not cpu_has_amx():
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    low = llama_cpp.llama_cpp  # Llama() takes its model parameters from here, with no option for this field
    default = low.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        low.llama_model_default_params = default


def modelfile_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.Modelfile")


def sentencepiece_proto(tok: Tokenizer) -> sp_pb2.ModelProto:
    """The tokenizer's SentencePiece model, refusing what llama.cpp's SentencePiece tokenizer would not replay."""
    data = tok.sentencepiece_model
    if data is None:
        raise UserError(f"{tok.source}: GGUF export needs a SentencePiece tokenizer (tokenizer.model, as "
                        "`babyllama data tokenizer` writes); llama.cpp cannot be told how to pre-tokenize this Hugging "
                        "Face tokenizer.json the way `tokenizers` does. Use export-hf for this model instead")
    proto = sp_pb2.ModelProto.FromString(data)
    norm = proto.normalizer_spec
    problems = [what for what, bad in (
        ("a non-BPE model type", proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE),
        ("normalization rules", bool(norm.precompiled_charsmap)),
        ("remove_extra_whitespaces", norm.remove_extra_whitespaces)) if bad]
    if problems:
        raise UserError(f"{tok.source}: this SentencePiece model has {' and '.join(problems)}, which llama.cpp's "
                        "tokenizer does not apply; retrain it with `babyllama data tokenizer`")
    return proto


def add_llama_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, name: str, file_type: gguf.LlamaFileType) -> None:
    """The `general.*` and `llama.*` keys llama.cpp builds the model from (sizes, context, RoPE, norm eps)."""
    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(file_type)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)


def _add_vocab(w: gguf.GGUFWriter, tok: Tokenizer, proto: sp_pb2.ModelProto) -> None:
    w.add_tokenizer_model("llama")  # llama.cpp's SentencePiece (score-driven BPE with byte fallback)
    w.add_tokenizer_pre("default")
    w.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([_PIECE_TYPES[p.type] for p in proto.pieces])
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    if tok.unk_id is not None:
        w.add_unk_token_id(tok.unk_id)
    end_of_turn = tok.token_to_id(IM_END)
    if end_of_turn is not None:  # a reply ends here (llama.cpp's end-of-generation tokens: eos and eot)
        w.add_eot_token_id(end_of_turn)
    w.add_add_bos_token(True)  # every babyllama sequence starts with <s>
    w.add_add_eos_token(False)
    if tok.token_to_id(IM_START) is not None and end_of_turn is not None:
        w.add_chat_template(CHAT_TEMPLATE)


def _add_tensors(w: gguf.GGUFWriter, cfg: ModelConfig, weights: dict[str, Tensor],
                 matrix_type: gguf.GGMLQuantizationType) -> None:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    for hf_name, tensor in weights.items():
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd as the output matrix when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"weight {hf_name}: no llama.cpp tensor name; is this a babyllama language model?")
        if hf_name.endswith("q_proj.weight"):
            tensor = to_interleaved_rope(tensor, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = to_interleaved_rope(tensor, cfg.n_kv_heads)
        data = tensor.float().numpy()
        qtype = matrix_type if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay f32
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # q8_0 needs rows that are a multiple of 32 values
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, packed, raw_dtype=qtype)


def to_interleaved_rope(weight: Tensor, n_heads: int) -> Tensor:
    """q/k projection rows reordered from HF's rotate-half RoPE (a head's pairs are (i, i + d/2)) to llama.cpp's
    (pairs (2i, 2i + 1)): llama.cpp's `LlamaModel.permute`, which undoes what HF's conversion of Meta's weights did."""
    rows = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, rows // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ======================================================================= ollama
def ollama_modelfile(gguf_file: Path, context: int, stops: list[str], sampling: SamplingConfig | None = None) -> str:
    """An ollama Modelfile for `gguf_file` (referred to by its name: keep the two side by side): babyllama's ChatML
    template in ollama's Go template syntax (ollama adds `<s>` itself, from the file's add_bos_token), stops at
    `stops` (`<|im_end|>` and `</s>`), and babyllama's default sampling (`SamplingConfig`)."""
    s = sampling or SamplingConfig()
    template = ("{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n{{ end }}"
                + IM_START + "assistant\n")
    return "\n".join([
        f"FROM ./{gguf_file.name}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{stop}"' for stop in stops),
        f"PARAMETER num_ctx {context}",
        f"PARAMETER temperature {s.temperature}",
        f"PARAMETER top_k {s.top_k}",
        f"PARAMETER top_p {s.top_p}",
        f"PARAMETER repeat_penalty {s.repetition_penalty}",
        "",
    ])
