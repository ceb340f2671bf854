"""Does your run reproduce a published one? Stage by stage: the training-loss curve step by step, the final
validation loss and every stage metric, judged against tolerances measured on real runs.

    babyllama compare --name baby                      # out/baby against docs/published/baby
    babyllama compare --name baby --reference /other/out/baby     # against any other run
    tensorboard --logdir_spec yours:runs/baby,published:docs/published/baby

A run directory holds <stage>/log.jsonl (one line per step, written by the trainer) and <stage>/run.json (the
command, config, machine and final metrics, written when the stage ends): out/<name> of a run and
docs/published/<name> are both run directories.

Your run is compared with the published reference of its numerics family: bf16 + compile where the CPU has native
bf16 (docs/published/<name>), fp32 + compile elsewhere (docs/published/<name>/fp32); run.json says which your
pretraining ran (--family overrides). Verdict per stage, with the bands of the published tolerance.json
(docs/reproducibility.md says how they were measured and how often they are wrong):
  reproduced  every step's |Δloss| within the band measured between the same command on other machines (other
              CPU kernels, 1 vs 2 processes), and every final metric within its band;
  drifted     beyond that, but the smoothed loss curve, the periodic validation loss and every final metric are
              within 4.5 standard deviations of the difference between two runs of the same recipe (the spread of
              5 seeds, and for an accuracy at least its binomial sampling error);
  diverged    beyond that: another recipe, data or code. The first diverging step is named and the exit code is 1.
A run with fewer steps than the reference is judged on the steps it has. Bad input exits 2 with one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from babyllama.cli import ArgumentParser
from babyllama.data.token_bins import corpus_differences
from babyllama.errors import UserError
from babyllama.eval.stats import binomial_sd, wilson_interval
from babyllama.files import write_atomic
from babyllama.hardware import cpu_has_native_bf16
from babyllama.shipped import PUBLISHED, portable
from babyllama.train.callbacks import read_text_log
from babyllama.train.run_config import PRESETS, STAGE_CONFIGS, preset_for
from babyllama.train.run_record import RUN_RECORD, read_run_record

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")
# The periodic validation loss: the same held-out batches in every run, so a far sharper check of the recipe than
# the training loss of other batches (seeds) is.
VAL_CURVE = "val_loss"
DATA_RECORD = "data.json"  # beside a published pretraining log: what its token data was made from
TOLERANCE = "tolerance.json"
# Config fields that may differ without making it another run: where outputs go, how data is prepared, when
# checkpoints are kept, and --stop-at (a partial run is judged on the steps it has).
_INCIDENTAL = {"out", "runs", "workers", "ckpt_every", "keep_checkpoints", "stop_at", "init", "tokenizer", "name",
               "resume", "device", "print_config", "eval_batch_size"}
REPRODUCED, DRIFTED, DIVERGED, UNJUDGED = "reproduced", "drifted", "diverged", "unjudged"
# Numerics families with a published reference each: what `--mixed-precision auto` pretrains in on a CPU with
# native bf16 (bf16 + compile) and on any other (fp32 + compile). The later stages run fp32 in both.
FAMILIES = ("bf16", "fp32")


def numerics_family(run_dir: Path) -> tuple[str, str]:
    """(the family of a run, why): from the numerics its pretraining recorded, else what auto picks on this CPU."""
    numerics = (read_run_record(Path(run_dir) / "pretrain" / RUN_RECORD) or {}).get("numerics") or {}
    if numerics.get("precision"):
        family = FAMILIES[0] if numerics["precision"] == "bf16" else FAMILIES[1]
        return family, f"your pretraining ran {numerics['precision']}"
    family = FAMILIES[0] if cpu_has_native_bf16() else FAMILIES[1]
    return family, "no pretraining run.json: the numerics --mixed-precision auto picks on this CPU"


def family_dir(published: Path, family: str) -> Path:
    """Where a family's reference lives: the bf16 one is docs/published/<name> itself, the others a subfolder."""
    return published if family == FAMILIES[0] else published / family


@dataclass
class StageLog:
    """What a run directory holds for one stage."""

    stage: str
    directory: Path
    steps: list[int]
    loss: list[float]
    record: dict | None  # run.json; None when the stage has not finished (or ran before records were kept)
    val: dict[int, float] = field(default_factory=dict)  # the periodic validation loss by step, when logged
    text: dict | None = None  # pretraining: the corpus record its token data was made from (`training_text`)

    @property
    def metrics(self) -> dict[str, float]:
        return comparable_metrics((self.record or {}).get("metrics", {}))

    @property
    def finished_steps(self) -> int | None:
        return (self.record or {}).get("steps")


def comparable_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's final metrics as two runs can compare them. A reward-model score is defined only up to a constant
    (the Bradley-Terry loss sees score differences), and each run scores with its own reward model: so a score
    counts as its gain over the run's starting model (heldout_score -> heldout_score_gain = heldout_score -
    heldout_before_score), and the starting model's own score not at all."""
    out = {}
    for name, value in metrics.items():
        if "score" not in name:
            out[name] = value
            continue
        before = name.replace("heldout_", "heldout_before_", 1)
        if before != name and before in metrics:
            out[f"{name}_gain"] = value - metrics[before]
    return out


def read_stage(run_dir: Path, stage: str) -> StageLog | None:
    """The stage's loss curve and run record; None when the run has no log of that stage."""
    directory = Path(run_dir) / stage
    log = directory / "log.jsonl"
    if not log.is_file():
        return None
    series = read_text_log(log)
    if "loss" not in series:
        raise UserError(f"{log}: no logged training loss (empty or not a log.jsonl); rerun the stage "
                        f"(babyllama {stage} ...) or delete its directory")
    record_path = directory / RUN_RECORD
    record = read_run_record(record_path)
    if record_path.exists() and record is None:
        raise UserError(f"{record_path}: not the JSON a stage writes; delete it to compare the log alone")
    steps, loss = series["loss"]
    return StageLog(stage, directory, steps, loss, record, dict(zip(*series.get(VAL_CURVE, ([], [])))),
                    training_text(directory) if stage == "pretrain" else None)


def training_text(stage_dir: Path) -> dict | None:
    """What a pretraining run's token data was made from: the corpus record of its meta.json (each file's name,
    size and a hash of its ends) and the documents read. A run directory has it in data/meta.json, a published
    run in pretrain/data.json (`babyllama publish` copies it). None when neither is there."""
    for path in (stage_dir / DATA_RECORD, stage_dir.parent / "data" / "meta.json"):
        if path.is_file():
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
                return {"corpus": meta["corpus"], "documents": meta["input"]["documents"]}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise UserError(f"{path}: not the token data record pretraining writes; delete it to compare "
                                "without the data check") from None
    return None


# ----------------------------------------------------------------------------------------------- differences
def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): the curve without batch-to-batch noise."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


@dataclass
class Difference:
    """Yours minus the reference on the steps both logged."""

    steps: list[int]
    yours: list[float]
    reference: list[float]
    window: int
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (yours, reference)
    val: list[tuple[int, float, float]] = field(default_factory=list)  # (step, yours, reference) validation loss

    @property
    def abs_delta(self) -> list[float]:
        return [abs(a - b) for a, b in zip(self.yours, self.reference)]

    @property
    def smoothed_delta(self) -> list[float]:
        return [abs(a - b) for a, b in zip(moving_average(self.yours, self.window),
                                            moving_average(self.reference, self.window))]

    def largest(self) -> tuple[float, int]:
        """(max |Δloss|, the step where it occurs)."""
        deltas = self.abs_delta
        i = max(range(len(deltas)), key=deltas.__getitem__)
        return deltas[i], self.steps[i]


def default_window(steps: int) -> int:
    """Moving-average window for a stage of `steps` steps: ~1/30 of the run, at least 5 steps."""
    return max(5, steps // 30)


def difference(yours: StageLog, reference: StageLog, window: int | None = None) -> Difference:
    ref = dict(zip(reference.steps, reference.loss))
    common = [(s, v) for s, v in zip(yours.steps, yours.loss) if s in ref]
    if not common:
        raise UserError(f"{yours.directory}/log.jsonl and {reference.directory}/log.jsonl share no logged step; "
                        "compare runs with the same --log-every")
    steps = [s for s, _ in common]
    diff = Difference(steps, [v for _, v in common], [ref[s] for s in steps],
                      window or default_window(len(reference.steps)))
    diff.val = [(s, v, reference.val[s]) for s, v in sorted(yours.val.items()) if s in reference.val]
    if yours.finished_steps is not None and yours.finished_steps == reference.finished_steps:
        diff.metrics = {k: (v, reference.metrics[k]) for k, v in yours.metrics.items() if k in reference.metrics}
    return diff


# ----------------------------------------------------------------------------------------------- tolerance
def envelope_band(envelope: list[list[float]], step: int) -> float:
    """The band at `step` of a [[from_step, band], ...] envelope (ascending; the last entry at or before it)."""
    band = envelope[0][1]
    for start, value in envelope:
        if start > step:
            break
        band = value
    return band


@dataclass
class Judgement:
    verdict: str
    first_step: int | None = None  # the first step beyond the band that decided the verdict
    reasons: list[str] = field(default_factory=list)


def judge(diff: Difference, tolerance: dict | None) -> Judgement:
    """Reproduced / drifted / diverged against one stage's entry of tolerance.json (see the module doc)."""
    if tolerance is None:
        return Judgement(UNJUDGED, reasons=["no measured tolerance for this stage (pass --tolerance)"])
    envelope, drift = tolerance["reproduced"]["loss"], tolerance["drifted"]
    over = [(s, d) for s, d in zip(diff.steps, diff.abs_delta) if d > envelope_band(envelope, s)]
    metric_reproduced, metric_drifted = tolerance["reproduced"]["metrics"], drift["metrics"]
    beyond_reproduced = _metrics_beyond(diff.metrics, metric_reproduced)
    val_band = drift.get(VAL_CURVE)
    val_over = [(s, abs(a - b)) for s, a, b in diff.val if val_band and not abs(a - b) <= envelope_band(val_band, s)]
    if not over and not beyond_reproduced and not val_over:
        return Judgement(REPRODUCED)
    reasons = []
    if over:
        s, d = over[0]
        reasons.append(f"|Δloss| {d:.2g} at step {s} beyond the reproduced band {envelope_band(envelope, s):.2g}")
    reasons += [f"{k} beyond its reproduced band ±{metric_reproduced[k]:.2g}" for k in beyond_reproduced]
    # from the first full window on: before it the "moving average" is of a few steps, as noisy as they are
    smoothed = [(s, d) for i, (s, d) in enumerate(zip(diff.steps, diff.smoothed_delta))
                if i >= diff.window - 1 and d > envelope_band(drift["smoothed_loss"], s)]
    beyond_drift = _metrics_beyond(diff.metrics, metric_drifted)
    if not smoothed and not beyond_drift and not val_over:
        return Judgement(DRIFTED, over[0][0] if over else None, reasons)
    firsts = []
    if smoothed:
        s, d = smoothed[0]
        band = envelope_band(drift["smoothed_loss"], s)
        reasons.append(f"smoothed |Δloss| {d:.3g} at step {s} beyond the band of other seeds {band:.3g}")
        firsts.append(_departure(diff, diff.steps.index(s), band))
    if val_over:
        s, d = val_over[0]
        reasons.append(f"{VAL_CURVE} |Δ| {d:.3g} at step {s} beyond the band of other seeds "
                       f"{envelope_band(val_band, s):.3g}")
        firsts.append(s)
    first = min(firsts) if firsts else None
    reasons += [f"{k} beyond the band of other seeds ±{metric_drifted[k]:.3g}" for k in beyond_drift]
    return Judgement(DIVERGED, first, reasons)


def _metrics_beyond(metrics: dict[str, tuple[float, float]], bands: dict[str, float]) -> list[str]:
    """The metrics (with a band) whose |yours - reference| is beyond it; NaN is beyond every band."""
    return [k for k, (a, b) in metrics.items() if k in bands and not abs(a - b) <= bands[k]]


def _departure(diff: Difference, crossing: int, band: float) -> int:
    """The step where a divergence starts: the smoothed curve crosses the band up to a window after the step
    whose own |Δloss| first left it."""
    deltas = diff.abs_delta
    start = max(0, crossing - diff.window + 1)
    return next((diff.steps[i] for i in range(start, crossing + 1) if deltas[i] > band), diff.steps[crossing])


# How measured differences become bands (docs/reproducibility.md gives the measurements behind them).
REPRODUCED_FACTOR = 3.0  # a band is 3x the largest difference measured between the same run on other machines
LOSS_FLOOR = 1e-4  # |Δloss| below this is agreement, whatever was measured (identical variants measure 0)
METRIC_FLOOR = 1e-4  # the same for metrics, relative to the published value (at least 1e-4 absolute)
# The drifted band is Z standard deviations of the difference between two faithful runs (sqrt(2) x one run's
# spread). Designed false-alarm rate: a faithful chain is called diverged at most FALSE_ALARM of the time. A chain
# makes about 250 checks (5 stages x ~30 independent windows of the loss curve and up to ~20 final metrics); for
# normal errors with a known spread, P(|x| > 4.5 sd) = 6.8e-6 per check, 0.17% per chain. The spread is estimated
# from 5 seeds, so the real rate is higher: docs/reproducibility.md measures it on held-back runs.
Z = 4.5
FALSE_ALARM = 0.01
POOL_WINDOWS = 4  # a step's seed spread is pooled over this many moving-average windows around it


@functools.cache  # the shipped files: read once per process, not per stage and per derived tolerance
def accuracy_counts() -> dict[str, int]:
    """n of every accuracy a stage reports, from the shipped evaluation files each is measured on: the choice items
    (overall and per language), the held-out skill items (overall and per skill) and the preference pairs of the
    reward and DPO validation accuracy. Prefixed names (before_, heldout_, heldout_before_) are measured on the
    same items."""
    from babyllama.data.jsonl import json_values
    from babyllama.shipped import CHAT_CHOICES, PREF_VALID, SKILLS_HELDOUT

    langs = [record.get("lang") for _, record in json_values(CHAT_CHOICES)]
    skills = [record.get("skill") for _, record in json_values(SKILLS_HELDOUT)]
    base = {"choice_acc": len(langs), **{f"choice_acc_{lang}": langs.count(lang) for lang in set(langs) if lang},
            "skill_acc": len(skills), **{f"skill_acc_{skill}": skills.count(skill) for skill in set(skills)},
            "val_accuracy": sum(1 for _ in json_values(PREF_VALID))}
    base["val_reward_accuracy"] = base["val_accuracy"]
    return {prefix + k: n for k, n in base.items() for prefix in ("", "before_", "heldout_", "heldout_before_")}


def seed_spread(curves: list[list[float]], pool: int) -> list[float]:
    """Per step, the standard deviation across runs of the same recipe (one value per run and step, equal lengths),
    pooled (root mean square) over `pool` steps around it: a steadier estimate than 5 values give alone."""
    n, k = len(curves[0]), len(curves)
    variance = [statistics.variance([c[i] for c in curves]) if k > 1 else 0.0 for i in range(n)]
    prefix = [0.0]
    for v in variance:
        prefix.append(prefix[-1] + v)
    half, out = pool // 2, []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out.append(math.sqrt((prefix[hi] - prefix[lo]) / (hi - lo)))
    return out


def _envelope(steps: list[int], bands: list[float], block: int) -> list[list[float]]:
    """A [[from_step, band], ...] envelope holding, per block of steps, the widest band in it."""
    return [[steps[i], max(bands[i:i + block])] for i in range(0, len(steps), block)]


def derive_tolerance(references: dict[str, Path], machines: dict[str, tuple[str, Path]],
                     seeds: dict[str, Path]) -> dict:
    """tolerance.json from measured runs: `references` the published run of each numerics family, `machines` the
    same command elsewhere (label -> (family, run dir): CPU kernels, threads, processes), `seeds` the first family's
    chain with another --seed. Stages a run did not make add nothing to that stage's bands.

    reproduced: every step's |Δloss| within REPRODUCED_FACTOR x the largest any machine run showed up to that step,
    every metric within that factor of the machine runs' largest difference.
    drifted: the smoothed loss curve within Z x sqrt(2) x the seeds' spread at that step (pooled over neighbouring
    steps), every metric within Z x sqrt(2) x its spread: over every finished run of the recipe (the references,
    seeds and machine runs: on other arithmetic a run ends as another draw), or its sampling error (binomial, an
    accuracy over n items) when that is larger; never tighter than the reproduced band."""
    primary = references[FAMILIES[0]]
    counts = accuracy_counts()
    stages, measured = {}, {label: {} for label in [*machines, *seeds]}
    for stage in STAGES:
        reference = read_stage(primary, stage)
        if reference is None:
            continue
        window = default_window(len(reference.steps))
        by_step: dict[int, float] = {}
        metric_delta: dict[str, float] = {}
        machine_smoothed: dict[int, float] = {}
        runs = [(label, family, directory) for label, (family, directory) in machines.items()]
        runs += [(label, FAMILIES[0], directory) for label, directory in seeds.items()]
        refs = {family: read_stage(directory, stage) for family, directory in references.items()}
        curves, finals = [moving_average(reference.loss, window)], {k: [v] for k, v in reference.metrics.items()}
        for family, other in refs.items():  # the other families' references: more draws of the metrics
            if family != FAMILIES[0] and other is not None and other.finished_steps == reference.finished_steps:
                for k, v in other.metrics.items():
                    finals.setdefault(k, []).append(v)
        val_steps = sorted(reference.val)
        val_curves, machine_val = [[reference.val[s] for s in val_steps]], {}
        for label, family, directory in runs:
            run, ref = read_stage(directory, stage), refs[family]
            if run is None or ref is None:
                continue
            diff = difference(run, ref, window)
            largest, at = diff.largest()
            deltas = {k: abs(a - b) for k, (a, b) in diff.metrics.items()}
            measured[label][stage] = {"steps": len(diff.steps), "max_abs_delta_loss": largest, "at_step": at,
                                      "max_smoothed_delta_loss": max(diff.smoothed_delta),
                                      "final_loss_delta": diff.yours[-1] - diff.reference[-1], "metrics": deltas}
            if label in machines:
                for s, d, sd in zip(diff.steps, diff.abs_delta, diff.smoothed_delta):
                    by_step[s] = max(by_step.get(s, 0.0), d)
                    machine_smoothed[s] = max(machine_smoothed.get(s, 0.0), sd)
                metric_delta = {k: max(metric_delta.get(k, 0.0), d) for k, d in {**metric_delta, **deltas}.items()}
                for s, a, b in diff.val:
                    machine_val[s] = max(machine_val.get(s, 0.0), abs(a - b))
            elif diff.steps == reference.steps:
                curves.append(moving_average(run.loss, window))
                if all(s in run.val for s in val_steps):
                    val_curves.append([run.val[s] for s in val_steps])
            if run.finished_steps == reference.finished_steps:  # a finished run of the recipe, machine or seed
                for k, v in run.metrics.items():
                    finals.setdefault(k, []).append(v)
        envelope, running = [], 0.0
        for s in sorted(by_step) or [reference.steps[0]]:
            running = max(running, by_step.get(s, 0.0))
            band = max(LOSS_FLOOR, REPRODUCED_FACTOR * running)
            if not envelope or band > envelope[-1][1]:
                envelope.append([s, band])
        metric_bands = {k: max(METRIC_FLOOR * max(1.0, abs(v)), REPRODUCED_FACTOR * metric_delta.get(k, 0.0))
                        for k, v in reference.metrics.items()}
        spread = seed_spread(curves, POOL_WINDOWS * window)
        curve_band = [max(Z * math.sqrt(2) * sd, REPRODUCED_FACTOR * machine_smoothed.get(s, 0.0), LOSS_FLOOR)
                      for s, sd in zip(reference.steps, spread)]
        metric_sd = {}
        for k, values in finals.items():
            seeds_sd = statistics.stdev(values) if len(values) > 1 else 0.0
            sampling = binomial_sd(reference.metrics[k], counts[k]) if k in counts else 0.0
            metric_sd[k] = max(seeds_sd, sampling)
        drifted = {}
        if val_steps:  # pooled over 3 evaluations: each with its neighbours
            val_band = [max(Z * math.sqrt(2) * sd, REPRODUCED_FACTOR * machine_val.get(s, 0.0), LOSS_FLOOR)
                        for s, sd in zip(val_steps, seed_spread(val_curves, 3))]
            drifted[VAL_CURVE] = [[s, band] for s, band in zip(val_steps, val_band)]
        stages[stage] = {
            "window": window,
            "runs": len(curves),
            "reproduced": {"loss": envelope, "metrics": metric_bands},
            # a run of the same command elsewhere is never judged beyond "drifted"
            "drifted": {"smoothed_loss": _envelope(reference.steps, curve_band, window),
                        "metrics": {k: max(Z * math.sqrt(2) * metric_sd.get(k, 0.0), band)
                                    for k, band in metric_bands.items()},
                        "metric_sd": metric_sd, **drifted},
        }
    return {"design": {"z": Z, "false_alarm": FALSE_ALARM, "reproduced_factor": REPRODUCED_FACTOR,
                       "loss_floor": LOSS_FLOOR, "metric_floor": METRIC_FLOOR, "pool_windows": POOL_WINDOWS},
            "machines": {label: family for label, (family, _) in sorted(machines.items())}, "seeds": sorted(seeds),
            "stages": stages, "measured": measured}


def load_tolerance(path: Path | None) -> dict:
    """The stages' bands from a tolerance.json; {} when there is none (verdicts are then 'unjudged')."""
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))["stages"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: not a tolerance file (`babyllama publish` tolerance writes them)") from None


# ----------------------------------------------------------------------------------------------- checks
def settings_of(log: StageLog) -> dict[str, Any]:
    """Every setting a stage record holds. Records made before each stage had its config kept the stage's own
    settings as `flags`, an unset one as None: that meant the stage's default, which is filled in."""
    record = log.record or {}
    flags, config = record.get("flags", {}), STAGE_CONFIGS.get(log.stage)
    if config is not None and None in flags.values():
        preset = preset_for(record.get("name") or "baby", flags.get("preset"))
        defaults = portable(dataclasses.asdict(config.for_preset(preset)))
        flags = {k: defaults.get(k) if v is None else v for k, v in flags.items()}
    return {**flags, **record.get("config", {})}


def check_same_recipe(yours: StageLog, reference: StageLog) -> list[str]:
    """Refuse another preset or tokenizer (one line); list the other config fields that differ."""
    if yours.record is None or reference.record is None:
        return []
    # only the settings both records name are compared (a pretraining-only field in an old SFT record is no recipe)
    a, b = settings_of(yours), settings_of(reference)
    shared = a.keys() & b.keys()
    a, b = {k: a[k] for k in shared}, {k: b[k] for k in shared}
    where = yours.directory / RUN_RECORD
    if a.get("model") != b.get("model"):
        raise UserError(f"{where}: model preset '{a.get('model')}' but the reference ran '{b.get('model')}'; "
                        "compare runs of the same preset (--name / --model)")
    tok_a, tok_b = yours.record.get("tokenizer"), reference.record.get("tokenizer")
    if tok_a and tok_b and tok_a != tok_b:
        raise UserError(f"{where}: trained with another tokenizer (fingerprint {tok_a}, the reference's {tok_b}); "
                        "train the tokenizer on the same --corpus with the same --vocab-size")
    num_a, num_b = yours.record.get("numerics"), reference.record.get("numerics")
    # what auto chose is what counts: --mixed-precision fp32 on one machine is auto on a CPU without native bf16
    requested = {"mixed_precision", "torch_compile"} if num_a and num_b else set()
    differ = [f"{k} {b.get(k)!r} -> {a.get(k)!r}" for k in sorted(set(a) | set(b))
              if k not in _INCIDENTAL | requested and a.get(k) != b.get(k)]
    differ += [f"{k} {num_b[k]!r} -> {num_a[k]!r} (what auto chose on each machine)"
               for k in sorted(num_a or {}) if num_a and num_b and num_a[k] != num_b.get(k)]
    ws_a, ws_b = yours.record.get("world_size", 1), reference.record.get("world_size", 1)
    if ws_a != ws_b:
        differ.append(f"processes {ws_b} -> {ws_a} (global batch {b.get('batch_size', 0) * ws_b} -> "
                      f"{a.get('batch_size', 0) * ws_a})")
    return differ


# ----------------------------------------------------------------------------------------------- report
@dataclass
class StageResult:
    stage: str
    judgement: Judgement
    diff: Difference
    notes: list[str]
    tolerance: dict | None = None

    def to_json(self) -> dict[str, Any]:
        largest, at = self.diff.largest()
        return {"stage": self.stage, "verdict": self.judgement.verdict, "first_step": self.judgement.first_step,
                "reasons": self.judgement.reasons, "steps_compared": len(self.diff.steps),
                "last_step": self.diff.steps[-1], "max_abs_delta_loss": largest, "at_step": at,
                "metrics": {k: {"yours": a, "reference": b} for k, (a, b) in self.diff.metrics.items()},
                "notes": self.notes}


def compare_stage(yours: StageLog, reference: StageLog, tolerance: dict | None) -> StageResult:
    notes = [f"config differs: {'; '.join(d)}" for d in [check_same_recipe(yours, reference)] if d]
    diff = difference(yours, reference, (tolerance or {}).get("window"))
    last, ref_last = yours.steps[-1], reference.steps[-1]
    if last < ref_last:
        notes.append(f"yours ends at step {last} of {ref_last}: judged on steps {diff.steps[0]}-{diff.steps[-1]} "
                     f"(finish it with babyllama {yours.stage} --resume)")
    elif last > ref_last:
        notes.append(f"yours runs to step {last}, the reference to {ref_last}: judged on the common steps")
    if yours.record is None:
        notes.append(f"no {RUN_RECORD} (the stage did not finish, or ran before records were kept): "
                     "final metrics not compared")
    elif not diff.metrics and reference.metrics:
        notes.append("final metrics not compared: the runs ended at different steps")
    judgement = judge(diff, tolerance)
    other_text = text_differences(yours, reference)
    if other_text:  # another training text is another recipe, whatever the curves could show
        judgement = Judgement(DIVERGED, diff.steps[0], [f"trained on other text: {'; '.join(other_text)}",
                                                       *judgement.reasons])
    return StageResult(yours.stage, judgement, diff, notes, tolerance)


def text_differences(yours: StageLog, reference: StageLog) -> list[str]:
    """How the text a pretraining run was made from differs from the reference's (empty when either is unknown)."""
    if yours.text is None or reference.text is None:
        return []
    differ = corpus_differences(reference.text["corpus"], yours.text["corpus"])
    if reference.text["documents"] != yours.text["documents"]:
        differ.append(f"{reference.text['documents']:,} documents vs now {yours.text['documents']:,}")
    return [d.replace(" vs now ", " in the reference vs ") for d in differ]


def plot_overlay(result: StageResult, tolerance: dict | None, path: Path, labels: tuple[str, str]) -> None:
    """Yours over the reference's loss curve, and |Δloss| per step against the reproduced band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = result.diff
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(3, 2))
    top.plot(diff.steps, diff.reference, label=labels[1], color="black", linewidth=1.6)
    top.plot(diff.steps, diff.yours, label=labels[0], color="tab:orange", linewidth=0.9, linestyle="--")
    top.set_ylabel("training loss")
    top.legend()
    top.set_title(f"{result.stage}: {result.judgement.verdict}")
    floor = 1e-9  # exact agreement drawn at the bottom of the log scale
    bottom.semilogy(diff.steps, [max(d, floor) for d in diff.abs_delta], label="|Δloss|", color="tab:orange",
                    linewidth=0.8)
    bottom.semilogy(diff.steps, [max(d, floor) for d in diff.smoothed_delta], label="smoothed |Δloss|",
                    color="tab:red", linewidth=1.2)
    if tolerance:
        bottom.semilogy(diff.steps, [envelope_band(tolerance["reproduced"]["loss"], s) for s in diff.steps],
                        label="reproduced band", color="tab:green", linestyle=":")
        bottom.semilogy(diff.steps, [envelope_band(tolerance["drifted"]["smoothed_loss"], s) for s in diff.steps],
                        label="same-recipe band (smoothed)", color="tab:gray", linestyle=":")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_metric(name: str, yours: float, reference: float, counts: dict[str, int], band: float | None) -> str:
    """One metric line: both values; for an accuracy its n and 95% interval; the difference and its band."""
    line = f"  {name:<28} {yours:>10.4f} vs {reference:>10.4f}  (Δ {yours - reference:+.4g}"
    if band is not None:
        line += f", same-recipe band ±{band:.3g}"
    if name in counts:
        (lo, hi), (rlo, rhi) = wilson_interval(yours, counts[name]), wilson_interval(reference, counts[name])
        line += f"; n {counts[name]}, 95% [{lo:.3f}, {hi:.3f}] vs [{rlo:.3f}, {rhi:.3f}]"
    return line + ")"


def format_result(result: StageResult) -> list[str]:
    diff, j = result.diff, result.judgement
    largest, at = diff.largest()
    verdict = j.verdict + (f" (first at step {j.first_step})" if j.verdict == DIVERGED and j.first_step else "")
    lines = [f"{result.stage}: {verdict}",
             f"  steps compared {len(diff.steps)} ({diff.steps[0]}-{diff.steps[-1]}); largest |Δloss| {largest:.3g} "
             f"at step {at}; last loss {diff.yours[-1]:.4f} vs {diff.reference[-1]:.4f}"]
    bands = ((result.tolerance or {}).get("drifted") or {}).get("metrics", {})
    counts = accuracy_counts() if diff.metrics else {}
    lines += [format_metric(name, a, b, counts, bands.get(name)) for name, (a, b) in diff.metrics.items()]
    lines += [f"  {reason}" for reason in j.reasons]
    lines += [f"  note: {note}" for note in result.notes]
    return lines


def compare_runs(yours_dir: Path, reference_dir: Path, tolerance: dict, stages: list[str] | None = None,
                 plots: Path | None = None, labels: tuple[str, str] = ("yours", "published")
                 ) -> tuple[list[StageResult], list[str]]:
    """Compare every stage the reference has (or `stages`); returns the results and the lines to print."""
    if not reference_dir.is_dir():
        raise UserError(f"{reference_dir}: no such run directory; pass --reference DIR (a run's out/<name>)")
    if not yours_dir.is_dir():
        raise UserError(f"{yours_dir}: no such run directory; train with --name first or pass --out")
    wanted = stages or [s for s in STAGES if (reference_dir / s / "log.jsonl").is_file()]
    results, lines = [], []
    for stage in wanted:
        reference = read_stage(reference_dir, stage)
        if reference is None:
            raise UserError(f"{reference_dir}/{stage}/log.jsonl: the reference has no {stage} stage")
        yours = read_stage(yours_dir, stage)
        if yours is None:
            if stages:
                raise UserError(f"{yours_dir}/{stage}/log.jsonl: no {stage} log in your run; run "
                                f"babyllama {stage} first")
            lines.append(f"{stage}: not run (no {yours_dir}/{stage}/log.jsonl)")
            continue
        result = compare_stage(yours, reference, tolerance.get(stage))
        if plots is not None:
            plot_overlay(result, tolerance.get(stage), plots / f"{stage}.png", labels)
        results.append(result)
        lines += format_result(result)
    if not results:
        raise UserError(f"{yours_dir}: none of the reference's stages ({', '.join(wanted)}) has a log; "
                        f"run babyllama {wanted[0] if wanted else 'pretrain'} first")
    return results, lines


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="baby", help="run name: compares <out>/<name> (default: baby)")
    ap.add_argument("--preset", choices=PRESETS, help="the recipe your run followed, whose published run is the "
                                                      "reference (default: the --name when it is a preset, else baby)")
    ap.add_argument("--out", default="out", help="output root of your run (the stages' --out)")
    ap.add_argument("--reference", default=None,
                    help="run directory to compare with (default: the published docs/published/<preset>)")
    ap.add_argument("--tolerance", default=None,
                    help="tolerance.json with the measured bands (default: docs/published/<preset>/tolerance.json)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, help="only these stages (default: all the reference has)")
    ap.add_argument("--plots", default=None, help="where the overlay PNGs go (default: <out>/<name>/compare)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--family", choices=FAMILIES, default=None,
                    help="which published reference (default: the numerics your pretraining ran in)")
    args = ap.parse_args(argv)
    yours_dir = Path(args.out) / args.name
    recipe = preset_for(args.name, args.preset)
    published = PUBLISHED / recipe
    family, why = (args.family, "--family") if args.family else numerics_family(yours_dir)
    reference_dir = Path(args.reference) if args.reference else family_dir(published, family)
    if args.reference is None and not published.is_dir():
        raise UserError(f"no published run of preset '{recipe}' (docs/published/ has "
                        f"{', '.join(sorted(p.name for p in PUBLISHED.glob('*/') if p.is_dir())) or 'none'}); "
                        "pass --reference DIR")
    tolerance = load_tolerance(Path(args.tolerance) if args.tolerance else published / TOLERANCE)
    if args.tolerance and not tolerance:
        raise UserError(f"--tolerance {args.tolerance}: no such file")
    plots = Path(args.plots) if args.plots else yours_dir / "compare"
    labels = ("yours", "published" if args.reference is None else "reference")
    results, lines = compare_runs(yours_dir, reference_dir, tolerance, args.stages, plots, labels)
    print(f"comparing {yours_dir} with {reference_dir}" +
          ("" if args.reference else f" (the {family} family's reference: {why})"))
    print("\n".join(lines))
    print(f"overlay plots in {plots}")
    if args.json:
        rows = [{**r.to_json(), "reference": str(reference_dir), "family": family} for r in results]
        write_atomic(Path(args.json), (json.dumps(rows, indent=1) + "\n").encode("utf-8"))
    return 1 if any(r.judgement.verdict == DIVERGED for r in results) else 0
