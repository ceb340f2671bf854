"""Keras-like trainer in the torch4keras style: `trainer.compile(...)` then `trainer.fit(loader, callbacks=...)`.

What a stage customises is the loss: a callable `loss(model, batch) -> loss` or `-> (loss, {metric: value})`;
the default is next-token cross-entropy on `(input_ids, targets)` batches. Everything else — mixed precision on the
actual device, gradient accumulation with DDP `no_sync`, clipping, all-reduced logging, tokens/s and MFU,
full-state checkpoints with the data position — is shared by every stage.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from babyllama.errors import UserError
from babyllama.hardware import separate_inductor_cache
from babyllama.model.config import ModelConfig
from babyllama.train.checkpoint import (
    check_model_config,
    last_good_hint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from babyllama.train.distributed import DistEnv, all_reduce_mean, full_state_dicts, load_full_state_dicts, shard_model
from babyllama.train.flops import peak_flops

LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, dict[str, Tensor]]"]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None, "no": None, "fp32": None}


def causal_lm_loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Next-token loss for `(input_ids, targets)` batches (targets already shifted, -100 = no loss)."""
    return model(batch[0], batch[1]).loss


class Callback:
    """Hooks called on every rank; loggers act on the main rank only (`trainer.env.is_main`)."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_batch_begin(self, trainer: "Trainer") -> None: ...  # before each (micro-)batch is drawn from the loader
    def on_step_end(self, trainer: "Trainer", logs: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


class Trainer:
    def __init__(self, model: nn.Module, env: DistEnv | None = None, model_config: ModelConfig | None = None):
        self.env = env or DistEnv()
        self.network = model.to(self.env.device)  # what is trained, unwrapped: parameters, state, evaluation
        self.fsdp = False
        self.model_config = model_config or getattr(model, "config", None)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.consumed = 0  # samples of the current epoch consumed by this rank
        self.stop_training = False
        self.extra_state: dict[str, Any] = {}  # stage-specific state saved in checkpoints (e.g. PPO's KL coef)

    def shard(self) -> None:
        """FSDP2: shard parameters, gradients and optimizer state over the ranks instead of replicating them (DDP),
        for configs that do not fit one GPU. Call before building the optimizer; a no-op in a single process."""
        if self.env.distributed and not self.fsdp:
            shard_model(self.network)
            self.fsdp = True

    # ---- compile ----
    def compile(self, loss: LossFn = causal_lm_loss, optimizer: torch.optim.Optimizer | None = None,
                scheduler: Any = None, clip_grad_norm: float | None = 1.0, mixed_precision: str | None = None,
                grad_accumulation_steps: int = 1, torch_compile: bool = False, log_every: int = 1,
                flops_per_token: float | None = None, ddp: bool | None = None, skip_nonfinite: bool = False,
                save_frozen: bool = True, eval_loss: LossFn | None = None) -> None:
        """ddp: wrap in DistributedDataParallel; None = when running on more than one rank (True at world size 1
        only makes sense for measuring DDP's overhead, which needs an initialised process group).
        log_every: the logged tokens/s and MFU cover all the steps since the previous log, callbacks excluded.
        skip_nonfinite: a step whose gradient norm is NaN/inf is not applied (counted in `skipped_steps`) instead
        of corrupting the weights; costs one host sync per step. (fp16's grad scaler skips overflows by itself.)
        save_frozen=False: checkpoints hold only the weights that train (LoRA adapters, new heads), the frozen rest
        being what the run started from; a resume then loads exactly those.
        eval_loss: what `evaluate` measures when not told (default: `loss`); e.g. distillation trains on a mixed loss
        but is validated on the plain next-token loss, comparable with runs without a teacher."""
        if mixed_precision not in _AUTOCAST:
            raise ValueError(f"mixed_precision must be one of 'bf16', 'fp16', None; got {mixed_precision!r}")
        if optimizer is None:
            raise ValueError("compile() needs an optimizer")
        self.loss_fn, self.optimizer, self.scheduler = loss, optimizer, scheduler
        self.eval_loss = eval_loss or loss
        self.clip_grad_norm, self.accum, self.log_every = clip_grad_norm, grad_accumulation_steps, log_every
        self.skip_nonfinite, self.save_frozen = skip_nonfinite, save_frozen
        self.amp_dtype = _AUTOCAST[mixed_precision]
        self.compiled = torch_compile
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=self.amp_dtype == torch.float16)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops(self.env.device)
        model: nn.Module = self.network
        if (self.env.distributed if ddp is None else ddp) and not self.fsdp:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        if torch_compile and self.env.device.type == "cpu":
            # inductor's CPU code adds up the embedding's gradient with atomic adds, in an order that changes from
            # run to run; in deterministic mode it calls aten's ordered kernel instead (published logs rely on
            # bit-identical reruns). Process-wide, as the flag is.
            torch.use_deterministic_algorithms(True, warn_only=True)
            separate_inductor_cache()
        self.wrapped = torch.compile(model) if torch_compile else model  # what a training step calls

    @property
    def precision(self) -> str:
        """The name of the dtype the steps compute in: bf16, fp16 or fp32 (no autocast)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    # ---- fit ----
    def fit(self, loader: Iterable, epochs: int | None = None, steps_per_epoch: int | None = None,
            max_steps: int | None = None, callbacks: Sequence[Callback] = ()) -> None:
        """Train until `epochs` passes over `loader` are done or `max_steps` optimizer steps in total (counting
        resumed ones), whichever comes first. Without `epochs`: as many passes as `max_steps` takes (one pass when
        neither is given)."""
        if epochs is None:
            epochs = 1 if max_steps is None else math.inf
        sampler = getattr(loader, "sampler", None)
        resumable = hasattr(sampler, "load_state_dict")
        for cb in callbacks:
            cb.on_train_begin(self)
        self.network.train()
        self._window_tokens, self._window_start = 0, time.perf_counter()  # throughput since the last logged step
        while self.epoch < epochs and not self._done(max_steps):
            if resumable:  # start of an epoch, or mid-epoch after --resume
                sampler.load_state_dict({"epoch": self.epoch, "consumed": self.consumed})
            self._run_epoch(iter(loader), steps_per_epoch, max_steps, callbacks)
            if self._done(max_steps):
                break
            for cb in callbacks:
                cb.on_epoch_end(self, self.epoch)
            self.epoch, self.consumed = self.epoch + 1, 0
        for cb in callbacks:
            cb.on_train_end(self)

    def _done(self, max_steps: int | None) -> bool:
        return self.stop_training or (max_steps is not None and self.step >= max_steps)

    def _run_epoch(self, batches: Any, steps_per_epoch: int | None, max_steps: int | None,
                   callbacks: Sequence[Callback]) -> None:
        steps_here = 0
        while not self._done(max_steps) and (steps_per_epoch is None or steps_here < steps_per_epoch):
            stats = self._train_step(batches, callbacks)
            if stats is None:  # epoch exhausted; a partial accumulation is dropped (like drop_last)
                self.optimizer.zero_grad(set_to_none=True)
                return
            self.step += 1
            steps_here += 1
            self._window_tokens += stats["tokens"]
            logged = self.step % self.log_every == 0
            logs = self._logs(stats) if logged else {}
            logs["step"] = self.step
            callbacks_start = time.perf_counter()
            for cb in callbacks:
                cb.on_step_end(self, logs)
            # callbacks (logging, checkpoints, evaluation) are not training: the window restarts after a logged
            # step's and skips a non-logged step's
            if logged:
                self._window_tokens, self._window_start = 0, time.perf_counter()
            else:
                self._window_start += time.perf_counter() - callbacks_start

    def _train_step(self, batches: Any, callbacks: Sequence[Callback]) -> dict[str, Any] | None:
        total_loss = torch.zeros((), device=self.env.device)
        metrics: dict[str, Tensor] = {}
        tokens = 0
        for micro in range(self.accum):
            for cb in callbacks:
                cb.on_batch_begin(self)  # e.g. PPO's next rollout (align.ppo_rollout.Rollouts)
            batch = next(batches, None)
            if batch is None:
                return None
            batch = _to_device(batch, self.env.device)
            with self._grad_sync(micro == self.accum - 1), self.autocast():
                out = self.loss_fn(self.wrapped, batch)
                loss, extra = out if isinstance(out, tuple) else (out, {})
                self.scaler.scale(loss / self.accum).backward()
            total_loss += loss.detach() / self.accum
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0) + torch.as_tensor(v, device=self.env.device).detach() / self.accum
            first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
            tokens += first.numel()
            self.consumed += first.shape[0]
        grad_norm = None
        skip = self.skip_nonfinite and not self.scaler.is_enabled()
        if self.clip_grad_norm or skip:
            self.scaler.unscale_(self.optimizer)
            # the norm of the all-reduced gradients: every rank takes the same decision below
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.clip_grad_norm or math.inf)
            grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        if skip and not bool(torch.isfinite(grad_norm)):
            self.extra_state["skipped_steps"] = self.extra_state.get("skipped_steps", 0) + 1
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": total_loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens, **metrics}

    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulation."""
        if self.fsdp:
            self.network.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        wrapper = getattr(self.wrapped, "_orig_mod", self.wrapped)
        return wrapper.no_sync() if isinstance(wrapper, DDP) and not sync else contextlib.nullcontext()

    def _logs(self, stats: dict[str, Any]) -> dict[str, float]:
        logs = {k: float(all_reduce_mean(v)) for k, v in stats.items() if isinstance(v, Tensor)}
        logs["lr"] = stats["lr"]
        if "skipped_steps" in self.extra_state:  # --on-nonfinite skip: how many steps were not applied so far
            logs["skipped_steps"] = self.extra_state["skipped_steps"]
        # read after float() waited for the device: on a GPU the kernels queued so far have run by now
        seconds = time.perf_counter() - self._window_start
        tokens_per_s = self._window_tokens * self.env.world_size / seconds
        logs["tokens_per_s"] = tokens_per_s
        if self.flops_per_token and self.peak_flops:
            logs["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.env.world_size)
        return logs

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self, loader: Iterable, loss: LossFn | None = None, max_batches: int | None = None) -> float:
        """Mean loss over (up to `max_batches` of) `loader`, averaged over ranks."""
        self.network.eval()
        total, n = torch.zeros((), device=self.env.device), 0
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with self.autocast():
                out = (loss or self.eval_loss)(self.network, _to_device(batch, self.env.device))
            total += (out[0] if isinstance(out, tuple) else out).float()
            n += 1
        self.network.train()
        return float(all_reduce_mean(total / max(n, 1)))

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state; under FSDP a collective that every rank must call."""
        model_state, optim_state = self.network.state_dict(), self.optimizer.state_dict()
        if self.fsdp:
            model_state, optim_state = full_state_dicts(self.network, self.optimizer)
        if not self.save_frozen:
            trained = self._trained_names()
            model_state = {k: v for k, v in model_state.items() if k in trained}
        return {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "step": self.step, "epoch": self.epoch, "consumed": self.consumed,
            "model_config": self.model_config.to_dict() if self.model_config else None,
            "extra": self.extra_state,
        }

    def weights_finite(self) -> bool:
        """No NaN/inf in any parameter, on any rank (under FSDP each rank checks its shards)."""
        ok = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
                 for p in self.network.parameters())
        return float(all_reduce_mean(torch.tensor(float(ok), device=self.env.device))) == 1.0

    def save_checkpoint(self, directory: str, keep: int | None = None) -> None:
        """Main rank writes atomically; all ranks wait so nobody runs ahead of a half-written file. Weights with
        NaN/inf are never written (so rotation never deletes the last good checkpoint for them)."""
        if not self.weights_finite():
            raise UserError(f"step {self.step}: the weights hold NaN/inf, so they were not saved; "
                            f"{last_good_hint(directory)}")
        state = self.state_dict() if self.fsdp or self.env.is_main else None
        if self.env.is_main:
            save_checkpoint(directory, self.step, state, keep)
        if self.env.distributed:
            torch.distributed.barrier()

    def resume(self, path: str, check: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Restore the full training state from a checkpoint file or the newest in a directory. `check(state)` may
        refuse the checkpoint (a UserError) before anything is restored."""
        state = load_checkpoint(path)  # CPU: RNG states must stay CPU tensors
        if self.model_config is not None:
            check_model_config(state, self.model_config, path)
        if check is not None:
            check(state)
        if self.fsdp:
            load_full_state_dicts(self.network, self.optimizer, state["model"], state["optimizer"])
        else:
            self._load_weights(state["model"], path)
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.extra_state = state.get("extra", {})

    def _trained_names(self) -> set[str]:
        return {name for name, p in self.network.named_parameters() if p.requires_grad}

    def _load_weights(self, weights: dict[str, Tensor], path: str) -> None:
        if self.save_frozen:
            self.network.load_state_dict(weights)
            return
        differ = set(weights) ^ self._trained_names()
        if differ:
            raise UserError(f"{path}: its weights are not those this run trains (e.g. {min(differ)}); resume with "
                            "the settings it was trained with")
        self.network.load_state_dict(weights, strict=False)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
