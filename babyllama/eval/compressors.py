"""Classical-compressor baseline: what a bits-per-byte number is worth next to PPMd and xz given the same text.

    babyllama baseline --name my                       # model vs PPMd vs xz on the run's held-out split
    babyllama baseline --name my --heldout my/test.jsonl # on held-out text of yours
    babyllama evaluate --name baby --stage pretrain    # beside each language's bpb too

A compressor that has seen the training text is the honest reference for a small language model: its held-out
bits per byte are (size of compress(train + held-out) - size of compress(train)) x 8 / held-out bytes.
- `train` is the text the model trained on: the documents of the run's `--corpus` that `prepare_token_bins`
  put in the train split (reproduced from the corpus, `--seed` and `--val-fraction` of `pretrain/run.json`, and
  checked against the split's document counts in `data/meta.json`), joined with newlines.
- `held-out` is the evaluated documents joined with newlines; the bytes divided by are the documents' UTF-8 bytes
  only, exactly the bytes the model's `bpb` is over (the compressor also pays for the newlines between
  documents, the model is not charged for document boundaries; measured negligible in docs/baseline.md).
- PPMd: PyPI `pyppmd`, variant I (PPMd8, as in zip), order 8, 256 MiB of model memory. xz: Python's `lzma`,
  preset 9 | extreme (`xz -9e`, 64 MiB dictionary).

Large corpora are sampled deterministically: when the train split holds more than `--max-train-mb` (16 MiB)
of UTF-8 text (estimated from `data/meta.json`'s input bytes), the compressors get every k-th training document
(k = ceil(estimate / budget), counted in corpus order) until the budget is full. The run's held-out split is read
up to `--max-heldout-kb` (256 KiB): its first documents in corpus order. Both are reported with the numbers.

A result is computed once and cached in `<out>/<name>/eval/baseline/<key>.json`, the key a hash of the corpus
identity (`corpus_record`: each file's name, size and a hash of its ends), the split, the held-out text, the
sampling budgets and the compressor settings. Pretraining also writes the baseline on its validation split to
TensorBoard as flat lines beside `val_bpb` (`CompressorReference`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from babyllama.cli import ArgumentParser, add_device_flag, add_flag
from babyllama.data.corpus import iter_corpus
from babyllama.data.token_bins import corpus_differences, corpus_record, read_meta, val_draws
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.eval.bpb import text_metrics
from babyllama.files import write_atomic
from babyllama.shipped import REPO_ROOT
from babyllama.train.checkpoint import latest_checkpoint, load_model, resolve_checkpoint
from babyllama.train.distributed import pick_device
from babyllama.train.run_record import read_run_record
from babyllama.train.trainer import Callback, Trainer

PPMD = {"max_order": 8, "mem_size": 256 << 20, "variant": "I"}
XZ_PRESET = 9 | lzma.PRESET_EXTREME
SEP = "\n"  # between documents, and between the training text and the held-out text
MAX_TRAIN_BYTES = 16 << 20
MAX_HELDOUT_BYTES = 256 << 10
METHOD = 1  # part of the cache key: bump when the computation changes so old results are not reused
NAMES = {"ppmd": "PPMd", "xz": "xz"}


# ======================================================================= the compressors
def _ppmd_size(data: bytes) -> int:
    try:
        import pyppmd
    except ImportError:
        raise UserError("the compressor baseline needs pyppmd: pip install -r requirements.txt") from None
    return len(pyppmd.compress(data, **PPMD))


def _xz_size(data: bytes) -> int:
    return len(lzma.compress(data, preset=XZ_PRESET))


COMPRESSORS = {"ppmd": _ppmd_size, "xz": _xz_size}


def compressor_bpb(train: Sequence[str], heldout: dict[str, Sequence[str]]) -> dict[str, Any]:
    """Held-out bits per byte of each compressor given `train`, for each named set of held-out documents:
    {"sets": {name: {"documents", "bytes", "<c>_bits", "<c>_bpb"}}, "seconds": {c: s}}."""
    train_bytes = SEP.join(train).encode("utf-8")
    prefix = train_bytes + SEP.encode() if train else b""
    sets: dict[str, dict[str, float]] = {}
    for name, docs in heldout.items():
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        if not n_bytes:
            raise UserError(f"held-out set {name!r} has no text to compress")
        sets[name] = {"documents": len(docs), "bytes": n_bytes}
    seconds = {}
    for c, size in COMPRESSORS.items():
        start = time.perf_counter()
        base = size(prefix)
        for name, docs in heldout.items():
            bits = 8 * (size(prefix + SEP.join(docs).encode("utf-8")) - base)
            sets[name].update({f"{c}_bits": bits, f"{c}_bpb": bits / sets[name]["bytes"]})
        seconds[c] = round(time.perf_counter() - start, 2)
    return {"sets": sets, "seconds": seconds}


def margin(model_bpb: float, sets_row: dict[str, float]) -> dict[str, Any]:
    """The model's margin over the best compressor on a set: positive = the model needs fewer bits."""
    best = min(COMPRESSORS, key=lambda c: sets_row[f"{c}_bpb"])
    ref = sets_row[f"{best}_bpb"]
    return {"best": best, "bits": ref - model_bpb, "pct": 100 * (ref - model_bpb) / ref}


# ======================================================================= the run's training text
@dataclass
class RunCorpus:
    """What a pretraining run trained on: its --corpus (paths, format, field), the split's seed and val_fraction,
    and the token data's meta.json (identity of the corpus files, document counts)."""

    paths: list[str]
    fmt: str
    field: str
    seed: int
    val_fraction: float
    meta: dict = field(repr=False)

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "RunCorpus":
        """From `<run_dir>/pretrain/run.json` (the corpus paths) and `<run_dir>/data/meta.json`."""
        run_dir = Path(run_dir)
        record = read_run_record(run_dir / "pretrain" / "run.json")
        if record is None or not isinstance(record.get("config"), dict):
            raise UserError(f"{run_dir / 'pretrain' / 'run.json'}: no record of the pretraining run (it writes one "
                            "when it finishes); the compressor baseline needs the run's --corpus")
        config = record["config"]
        try:
            rc = cls([_find(str(p)) for p in config["corpus"]], config.get("corpus_format", "auto"),
                     config.get("corpus_field", "text"), int(config["seed"]), float(config["val_fraction"]),
                     read_meta(run_dir / "data"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{run_dir / 'pretrain' / 'run.json'}: its config lacks a usable corpus, seed or "
                            f"val_fraction ({type(e).__name__}: {e})") from None
        rc.check_identity(run_dir / "data")
        return rc

    def check_identity(self, data_dir: Path) -> None:
        """Refuse corpus files that are not those the token data was prepared from."""
        saved = self.meta.get("corpus")
        if isinstance(saved, dict) and not any(isinstance(f, str) for f in saved.get("files") or []):
            differ = corpus_differences(saved, self.identity)
            if differ:
                raise UserError(f"{data_dir / 'meta.json'}: the run trained on another corpus than "
                                f"{' '.join(self.paths)} is now ({'; '.join(differ)}); no baseline for it")

    @classmethod
    def of_config(cls, run: Any, data_dir: Path) -> "RunCorpus":
        """From a `PretrainConfig` (a pretraining run in progress) and its prepared token data."""
        return cls(list(run.corpus), run.corpus_format, run.corpus_field, run.seed, run.val_fraction,
                   read_meta(data_dir))

    @property
    def identity(self) -> dict:
        return corpus_record(self.paths, self.fmt, self.field)

    def split(self) -> Iterator[tuple[bool, str]]:
        """(is_val, document) in corpus order, as `prepare_token_bins` split them: one seeded uniform draw per
        document, val when below val_fraction; a split that leaves val empty moves the last document there."""
        is_val = val_draws(self.seed, self.val_fraction)
        held: str | None = None  # the last training document, yielded once the next arrives
        any_val = False
        for doc in iter_corpus(self.paths, self.fmt, self.field):
            if is_val(1)[0]:
                any_val = True
                yield True, doc
                continue
            if held is not None:
                yield False, held
            held = doc
        if held is not None:
            yield (not any_val and self.val_fraction > 0), held


def _find(path: str) -> str:
    """A corpus path as run.json keeps it (relative to where the run was started): the working directory first,
    then the repository (the shipped corpus)."""
    if Path(path).is_absolute() or Path(path).exists() or any(c in path for c in "*?["):
        return path
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else path


@dataclass
class Sample:
    train: list[str]
    heldout: list[str]
    info: dict[str, Any]


def sample_split(rc: RunCorpus, max_train_bytes: int = MAX_TRAIN_BYTES, max_heldout_bytes: int = MAX_HELDOUT_BYTES,
                 need_train: bool = True) -> Sample:
    """The training documents the compressors get (every k-th when the train split exceeds `max_train_bytes`) and
    the first held-out documents up to `max_heldout_bytes`. Without `need_train`, stops at the held-out budget."""
    estimate = int(rc.meta.get("input", {}).get("bytes", 0) * (1 - rc.val_fraction))
    stride = max(1, math.ceil(estimate / max_train_bytes))
    train, heldout, counts = [], [], {"train": 0, "val": 0, "train_bytes": 0, "heldout_bytes": 0}
    complete = True
    for is_val, doc in rc.split():
        n = len(doc.encode("utf-8"))
        if is_val:
            if counts["heldout_bytes"] < max_heldout_bytes:
                heldout.append(doc)
                counts["heldout_bytes"] += n
            elif not need_train:
                complete = False
                break
            counts["val"] += 1
        else:
            if need_train and counts["train"] % stride == 0 and counts["train_bytes"] < max_train_bytes:
                train.append(doc)
                counts["train_bytes"] += n
            counts["train"] += 1
    if complete:
        _check_counts(rc, counts)
    info = {"train_documents": len(train), "train_bytes": counts["train_bytes"], "stride": stride,
            "train_split_documents": counts["train"] if complete else None, "heldout_documents": len(heldout)}
    return Sample(train, heldout, info)


def _check_counts(rc: RunCorpus, counts: dict[str, int]) -> None:
    """The reproduced split must have the document counts the token data has (a guard on the split rule)."""
    splits = rc.meta.get("splits", {})
    want = {s: splits.get(s, {}).get("documents") for s in ("train", "val")}
    if want != {"train": counts["train"], "val": counts["val"]}:
        raise UserError(f"the train/val split of {' '.join(rc.paths)} reproduced here ({counts['train']:,} / "
                        f"{counts['val']:,} documents) is not the token data's ({want['train']} / {want['val']}); "
                        "was the corpus edited since? no baseline for it")


# ======================================================================= cached results
def cache_key(rc: RunCorpus, heldout: str, max_train_bytes: int) -> str:
    """A hash of everything a result depends on; `heldout` names the held-out text (its hash, or the val split)."""
    try:
        import pyppmd
        ppmd_version = pyppmd.__version__
    except ImportError:
        ppmd_version = None
    parts = {"method": METHOD, "corpus": rc.identity, "seed": rc.seed, "val_fraction": rc.val_fraction,
             "heldout": heldout, "max_train_bytes": max_train_bytes, "ppmd": PPMD, "pyppmd": ppmd_version,
             "xz": XZ_PRESET, "sep": SEP}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def text_hash(sets: dict[str, Sequence[str]]) -> str:
    digest = hashlib.sha256()
    for name, docs in sets.items():
        digest.update(json.dumps([name, list(docs)], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def run_baseline(run_dir: str | Path, heldout: dict[str, Sequence[str]] | None = None,
                 max_train_bytes: int = MAX_TRAIN_BYTES, max_heldout_bytes: int = MAX_HELDOUT_BYTES,
                 rc: RunCorpus | None = None) -> dict[str, Any]:
    """The compressors' bpb given the run's training text, on `heldout` (name -> documents) or, when None, on
    the run's own held-out split (set "val"). Cached in <run_dir>/eval/baseline/; "cached" says whether it was."""
    rc = rc or RunCorpus.of_run(run_dir)
    key = cache_key(rc, text_hash(heldout) if heldout is not None else f"val:{max_heldout_bytes}", max_train_bytes)
    path = Path(run_dir) / "eval" / "baseline" / f"{key}.json"
    if path.is_file():
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged cache file: computed again and rewritten
    sample = sample_split(rc, max_train_bytes, max_heldout_bytes)
    sets = heldout if heldout is not None else {"val": sample.heldout}
    result = {"key": key, "corpus": [str(p) for p in rc.paths], **compressor_bpb(sample.train, sets),
              "train": sample.info, "settings": {"ppmd": PPMD, "xz": "preset 9 | extreme", "sep": SEP}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    except OSError as e:  # a read-only or full run directory: the result stands, only the cache is lost
        print(f"note: compressor baseline not cached in {path.parent} ({e.strerror or e})")
    return {**result, "cached": False}


# ======================================================================= presentation
def baseline_metrics(model_bpb: dict[str, float], baseline: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per set: `<set>_bpb_ppmd`, `<set>_bpb_xz`, and the model's margin over the best one,
    `<set>_margin_pct` and `<set>_margin_bits` (positive = the model is better)."""
    out = {}
    for name, bpb in model_bpb.items():
        row = baseline["sets"][name]
        m = margin(bpb, row)
        out[name] = {**{f"{name}_bpb_{c}": row[f"{c}_bpb"] for c in COMPRESSORS},
                     f"{name}_margin_pct": m["pct"], f"{name}_margin_bits": m["bits"]}
    return out


def comparison_lines(model_bpb: dict[str, float], baseline: dict[str, Any]) -> list[str]:
    """A Markdown table: per held-out set, the model's bpb, each compressor's, and the margin over the best."""
    lines = ["| held-out | bytes | model bpb | " + " | ".join(f"{NAMES[c]} bpb" for c in COMPRESSORS)
             + " | model's margin over the best |", "|---|---|---|" + "---|" * len(COMPRESSORS) + "---|"]
    for name, bpb in model_bpb.items():
        row, m = baseline["sets"][name], margin(bpb, baseline["sets"][name])
        cells = " | ".join(f"{row[f'{c}_bpb']:.3f}" for c in COMPRESSORS)
        lines.append(f"| {name} | {row['bytes']:,} | {bpb:.3f} | {cells} | {m['pct']:+.1f}% ({m['bits']:+.3f} bits "
                     f"per byte) over {NAMES[m['best']]} |")
    return lines + ["", describe(baseline)]


def describe(baseline: dict[str, Any]) -> str:
    """One line: what the compressors were given, how long they took, where the result is cached."""
    t = baseline["train"]
    sampled = (f", every {t['stride']}th document of the train split (it is over the budget)" if t["stride"] > 1
               else "")
    took = " + ".join(f"{NAMES[c]} {s:.1f} s" for c, s in baseline["seconds"].items())
    return (f"Compressors given the run's training text ({t['train_documents']:,} documents, "
            f"{t['train_bytes'] / 1e6:.2f} MB{sampled}): PPMd order {PPMD['max_order']} "
            f"{PPMD['mem_size'] >> 20} MiB var. {PPMD['variant']}, xz -9e; margin: positive = the model needs fewer "
            f"bits. Computed in {took}{', cached' if baseline.get('cached') else ''} (key {baseline['key']}).")


# ======================================================================= pretraining: TensorBoard reference lines
class CompressorReference(Callback):
    """Adds `val_bpb` = val_loss x tokens per byte / ln 2 to every step that logs `val_loss` (tokens per byte of
    the whole prepared corpus, `</s>` included, from data/meta.json: an estimate of the validation split's);
    `write_lines` then draws the compressors' bpb on the run's held-out split as flat lines. Place it after the
    `Evaluator`, before the loggers. Main rank only."""

    def __init__(self, rc: RunCorpus, run_dir: Path, log_dir: Path, eval_every: int, max_steps: int):
        self.rc, self.run_dir, self.log_dir = rc, Path(run_dir), Path(log_dir)
        self.eval_every, self.max_steps = eval_every, max_steps
        splits, n_bytes = rc.meta.get("splits", {}), rc.meta.get("input", {}).get("bytes", 0)
        tokens = sum(s.get("tokens", 0) for s in splits.values())
        self.tokens_per_byte = tokens / n_bytes if tokens and n_bytes and rc.val_fraction > 0 else None
        self.last_val_bpb: float | None = None

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if self.tokens_per_byte is not None and "val_loss" in logs and math.isfinite(logs["val_loss"]):
            logs["val_bpb"] = self.last_val_bpb = logs["val_loss"] * self.tokens_per_byte / math.log(2)

    def write_lines(self, trainer: Trainer) -> None:
        """When the run reached `max_steps` (a run stopped early draws them when resumed to the end): the
        compressors' bpb on the held-out split as `val/val_bpb_ppmd` and `val/val_bpb_xz`, at the first validation
        step and the last step, and a custom-scalars chart holding them with `val/val_bpb`; printed too. Call it
        after `fit`, so a failure here cannot cost the final checkpoint; a failure is one printed line."""
        if not trainer.env.is_main or self.last_val_bpb is None or trainer.step < self.max_steps:
            return
        try:
            baseline = run_baseline(self.run_dir, rc=self.rc)
        except (UserError, OSError) as e:  # the trained model is saved already; this only loses the lines
            print(f"note: no compressor baseline: {e}")
            return
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(self.log_dir))
        for c in COMPRESSORS:
            for step in sorted({min(self.eval_every, trainer.step), trainer.step}):
                writer.add_scalar(f"val/val_bpb_{c}", baseline["sets"]["val"][f"{c}_bpb"], step)
        writer.add_custom_scalars({"bits per byte": {"validation vs compressors": [
            "Multiline", ["val/val_bpb"] + [f"val/val_bpb_{c}" for c in COMPRESSORS]]}})
        writer.close()
        print("held-out split of the corpus, val_bpb estimated from val_loss (exact: babyllama baseline "
              f"--name {self.run_dir.name} --out {self.run_dir.parent}):\n"
              + "\n".join(comparison_lines({"val": self.last_val_bpb}, baseline)))


# ======================================================================= command line
def compare_run(run_dir: Path, stage: str, heldout_files: Sequence[str], device: str, max_train_bytes: int,
                max_heldout_bytes: int) -> list[str]:
    """Markdown lines: the newest checkpoint of `stage` against the compressors, on the run's held-out split or on
    `heldout_files` (read like the run's corpus, up to `max_heldout_bytes`)."""
    stage_dir = run_dir / stage
    if latest_checkpoint(stage_dir) is None:  # before the compressors' minutes of work
        raise UserError(f"{stage_dir}: no checkpoint (step_*.pt) here; train that stage first or pass another "
                        "--stage (or --name/--out)")
    rc = RunCorpus.of_run(run_dir)
    if heldout_files:
        docs = _first_bytes(iter_corpus(heldout_files, rc.fmt, rc.field), max_heldout_bytes)
        sets = {"heldout": docs}
        baseline = run_baseline(run_dir, sets, max_train_bytes, rc=rc)
    else:
        sets = {"val": sample_split(rc, max_heldout_bytes=max_heldout_bytes, need_train=False).heldout}
        baseline = run_baseline(run_dir, None, max_train_bytes, max_heldout_bytes, rc=rc)
    tok = Tokenizer.load(run_dir / "tokenizer")
    checkpoint = resolve_checkpoint(run_dir / stage)
    model = load_model(checkpoint, device, tokenizer=tok)
    model_bpb = {name: text_metrics(model, tok, docs)["bpb"] for name, docs in sets.items()}
    where = ("the run's held-out split (the documents pretraining kept out of training)" if not heldout_files
             else ", ".join(heldout_files))
    return [f"# {run_dir.name}: `{checkpoint}` against classical compressors", "", f"Held-out text: {where}.", "",
            *comparison_lines(model_bpb, baseline)]


def _first_bytes(docs: Iterable[str], max_bytes: int) -> list[str]:
    out, n = [], 0
    for doc in docs:
        if n >= max_bytes:
            break
        out.append(doc)
        n += len(doc.encode("utf-8"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="baby", help="run name: reads <out>/<name>")
    add_flag(ap, "--out", "--root", default="out", help="the runs' output root (the stages' --out)")
    ap.add_argument("--stage", default="pretrain", help="whose newest checkpoint is compared (default pretrain)")
    ap.add_argument("--heldout", nargs="+", default=[], help="held-out files instead of the run's held-out split "
                    "(read with the run's --corpus-format and --corpus-field)")
    ap.add_argument("--max-train-mb", type=float, default=MAX_TRAIN_BYTES / 2**20,
                    help="MiB of training text given to the compressors; more is sampled (every k-th document)")
    ap.add_argument("--max-heldout-kb", type=float, default=MAX_HELDOUT_BYTES / 2**10,
                    help="KiB of held-out text compared (its first documents)")
    add_device_flag(ap)
    args = ap.parse_args(argv)
    if args.max_train_mb <= 0 or args.max_heldout_kb <= 0:
        raise UserError("--max-train-mb and --max-heldout-kb must be positive")
    lines = compare_run(Path(args.out) / args.name, args.stage, args.heldout, pick_device(args.device),
                        int(args.max_train_mb * 2**20), int(args.max_heldout_kb * 2**10))
    print("\n".join(lines))
