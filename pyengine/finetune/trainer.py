"""The fine-tune loop: data (validated before anything is written), model + LoRA, AdamW with
warmup + cosine, gradient accumulation with exact normalisation, bf16 autocast,
evaluation before and after, metrics / plot / adapter outputs, atomic checkpoints and
exact resume.

Determinism: micro-batch m of the run is batch (m mod B) of epoch (m div B) in that
epoch's permutation fixed by (seed, epoch), so the data position is a function of the
step alone; a checkpoint is taken only at a step boundary and stores the trainable
weights, optimizer, scheduler, the torch/python RNG states and the per-step losses /
grad norms that metrics.jsonl is computed from, so a resumed run repeats the
uninterrupted run's losses, metrics.jsonl and adapter bit for bit.  Wall-clock numbers
stay out of metrics.jsonl (timing.jsonl, the returned result and the summary have them).

Evaluation during training (--eval-every) adds its lines to metrics.jsonl; the best step
by --metric-for-best and the early-stopping count live in TrainState, so checkpoints
hold them, and under --load-best-at-end each new best is checkpointed (after its step's
log line) and spared by the rotation.  eval_every, the early-stopping settings and
load_best_at_end cannot change on --resume (nor eval_data / eval_batch_size under
eval_every): they decide when the run stops and which weights it exports; a run that
stopped early stays stopped.  --eval-only (EvalRun) trains nothing and writes eval.json.

Safety: the output directory must be empty unless --resume (the stored config must
match in every key that alters training) or --overwrite (cleared only after every input
was validated, and only when it is a run's directory: its .pyengine-run marker, a
checkpoint or metrics.jsonl is there); it is never the model directory, inside it, or a parent of the inputs.
Ctrl-C or SIGTERM stops at the next step boundary with a checkpoint; a finished run
leaves a final checkpoint, so --resume --max-steps N extends it.

Under torchrun (pyengine.finetune.distributed) rank r trains its slice of each step's
window of the single-process run with grad_accum x world micro-batches; every rank takes
part in checkpoints and stops, `is_main` (rank 0) alone writes files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from pyengine import data as D
from pyengine import models as M
from pyengine.finetune import evaluation as E
from pyengine.finetune.config import FIELDS, RESUMABLE_CHANGES, FinetuneConfig
from pyengine.finetune.distributed import Dist
from pyengine.patching import patch

log = logging.getLogger("pyengine.finetune")
CHECKPOINT_PREFIX = "checkpoint-"
KEEP_CHECKPOINTS = 2
TIMING_NAME = "timing.jsonl"  # tokens/s per logging window, kept out of metrics.jsonl
RUN_MARKER = ".pyengine-run"  # written first into every output: --overwrite clears only these
STORED_DEFAULTS = {"world_size": 1}  # stored-config keys that older checkpoints lack


@dataclass
class TrainState:
    step: int = 0
    losses: list = field(default_factory=list)      # one per optimizer step
    grad_norms: list = field(default_factory=list)  # one per optimizer step (before clipping)
    metrics: list = field(default_factory=list)     # one per logging step
    eval_before: dict | None = None
    tokens: int = 0
    train_seconds: float = 0.0
    evals: list = field(default_factory=list)       # metrics.jsonl lines of --eval-every
    best_step: int | None = None                    # by --metric-for-best
    best_metric: float | None = None
    bad_evals: int = 0                              # evaluations since an improvement
    stopped_early: bool = False


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C / SIGTERM at a step boundary; `checkpoint` holds it."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class Run:
    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.compute_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.dist = Dist()  # torchrun's rank (every rank validates; rank 0 alone writes)
        self.is_main = self.dist.is_main
        self.tensorboard = None
        # 1. Everything that can fail on user input, before anything is written.
        M.check_backends()
        check_output(cfg)
        if cfg.report_to == "tensorboard":
            summary_writer_class()
        self.tokenizer = M.load_tokenizer(cfg.model)
        self.train = D.Dataset(cfg.data, cfg.task, self.tokenizer, cfg.max_seq_len, cfg.labels,
                               cfg.packing, index_labels=cfg.labels is not None)
        self.labels = self.train.labels
        self.load_eval_data()
        self.data_sha256 = file_sha256(cfg.data)
        self.checkpoint = None  # the one to resume from
        if cfg.resume:
            path = latest_checkpoint(self.out)
            if path is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint in {self.out}")
            self.checkpoint = read_checkpoint(path)
            resumable = RESUMABLE_CHANGES - ({"eval_data", "eval_batch_size"} if cfg.eval_every
                                             else set())
            changed = [f"{k} {old!r} -> {new!r}" for k, old, new in
                       config_changes(self.checkpoint["config"], self.stored_config(), resumable)]
            if changed:
                raise ValueError(f"--resume: {path} was trained with other settings: "
                                 f"{'; '.join(changed)} (only {', '.join(sorted(resumable))}"
                                 f" may change; start a new run in another --output instead)")
        self.batches_per_epoch = D.batches_per_epoch(len(self.train), cfg.batch_size)
        self.accum = cfg.grad_accum * self.dist.world  # micro-batches per step, all ranks
        self.total_steps = cfg.max_steps or max(1, math.ceil(
            cfg.epochs * self.batches_per_epoch / self.accum))
        if self.checkpoint is not None and self.checkpoint["state"]["step"] > self.total_steps:
            raise ValueError(f"--resume: {self.checkpoint['path']} is at step "
                             f"{self.checkpoint['state']['step']}, past this run's "
                             f"{self.total_steps} steps (raise --max-steps / --epochs)")
        # 2. Model.
        seed_everything(cfg.seed)
        self.model = M.load_model(cfg.model, cfg.task, self.labels, self.tokenizer.pad_token_id)
        self.prepare_model()
        self.dist.wrap(self.model, cfg.method)  # FSDP2 replaces the parameters: name them after
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in self.params if p.ndim >= 2]
        no_decay = [p for n, p in self.params if p.ndim < 2]
        # fused: one kernel over all parameters per step, not a Python loop over them
        self.optimizer = torch.optim.AdamW(
            [dict(params=decay, weight_decay=cfg.weight_decay),
             dict(params=no_decay, weight_decay=0.0)], lr=cfg.lr, fused=True)
        from transformers import get_cosine_schedule_with_warmup
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps)
        self.state = TrainState()
        if self.dist.world > 1:  # the same init everywhere, then each rank its own dropout
            seed_everything(cfg.seed + self.dist.rank)

    # ------------------------------------------------------------------ model
    def prepare_model(self):
        cfg, model = self.cfg, self.model
        if cfg.method == "lora":
            from pyengine.lora import apply_lora
            for p in model.parameters():
                p.requires_grad_(False)
            apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       target_modules=cfg.target_modules, rslora=cfg.rslora,
                       quant=_quant_format(cfg))
            self.heads = M.head_modules(model) if cfg.task != "causal-lm" else []
            for name in self.heads:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
            if cfg.dtype == "bf16":  # frozen base in bf16: half the memory, no per-step casts
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
        use_kernels(model, cfg.ce_filter_eps)
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

    def trainable_state(self) -> dict:
        return self.dist.trainable_state(self.params)

    def stored_config(self) -> dict:
        """The config as a checkpoint keeps it: input paths absolute, plus the data's hash."""
        cfg = self.cfg.to_dict()
        for key in ("model", "data", "eval_data"):
            if cfg[key] is not None:
                cfg[key] = str(Path(cfg[key]).resolve())
        cfg["data_sha256"] = self.data_sha256
        cfg["world_size"] = self.dist.world  # the global batch depends on it
        return cfg

    # ------------------------------------------------------------------ data
    def micro_batch(self, m: int):
        """Micro-batch m of the run: batch (m mod B) of epoch (m div B)."""
        epoch, idx = divmod(m, self.batches_per_epoch)
        order = self._order(epoch)
        picked = order[idx * self.cfg.batch_size:(idx + 1) * self.cfg.batch_size]
        return D.collate([self.train.examples[i] for i in picked], self.tokenizer.pad_token_id)

    def _order(self, epoch):
        if getattr(self, "_order_cache", (None,))[0] != epoch:
            self._order_cache = (epoch, D.epoch_order(len(self.train), self.cfg.seed, epoch))
        return self._order_cache[1]

    def load_eval_data(self):
        """--eval-data and --test-data, validated with the run's class names."""
        cfg = self.cfg
        self.eval, self.test = (
            D.Dataset(path, cfg.task, self.tokenizer, cfg.max_seq_len, self.labels,
                      index_labels=cfg.labels is not None) if path else None
            for path in (cfg.eval_data, cfg.test_data))

    def eval_batches(self, dataset):
        ex = dataset.examples
        bs = self.cfg.eval_batch_size
        for s in range(0, len(ex), bs):
            yield D.collate(ex[s:s + bs], self.tokenizer.pad_token_id)

    def evaluate(self, dataset=None):
        """The report of the model on `dataset` (default: --eval-data; None without one)."""
        dataset = self.eval if dataset is None else dataset
        if dataset is None:
            return None
        return self.dist.call(lambda model: M.evaluate(
            self.cfg.task, model, self.eval_batches(dataset), self.compute_dtype, self.labels))

    def evaluate_during_training(self) -> bool:
        """--eval-every: one metrics.jsonl line and the best step / early stopping state;
        True when this evaluation is the new best."""
        st, t0 = self.state, time.perf_counter()
        report = self.evaluate()
        self.last_eval = (st.step, report)
        values = E.scalars(self.cfg.task, report)
        st.evals.append(dict(step=st.step, epoch=self.epoch(),
                             **{f"eval_{k}": v for k, v in values.items()}))
        best = E.track(st, self.cfg, values)
        self.write_metrics()
        self.log_scalars("eval", values)
        self.append_timing(dict(step=st.step, eval_seconds=time.perf_counter() - t0))
        if st.stopped_early:
            log.info("early stopping at step %d: %d evaluations without improvement of %s "
                     "(best %g at step %d)", st.step, st.bad_evals, self.cfg.metric_for_best,
                     st.best_metric, st.best_step)
        return best

    def load_best(self):
        """--load-best-at-end: the trainable weights of the best step's checkpoint."""
        st = self.state
        if st.best_step is None or st.best_step == st.step:
            return
        ckpt = read_checkpoint(self.out / f"{CHECKPOINT_PREFIX}{st.best_step:07d}")
        self.dist.load_trainable(self.params, ckpt["trainable"])
        log.info("loaded the best weights: step %d (%s %g)", st.best_step,
                 self.cfg.metric_for_best, st.best_metric)

    # ------------------------------------------------------------------ training
    def accumulate(self, step: int) -> tuple[float, int]:
        """Forward + backward of step's micro-batches: gradients only, no weight changes.
        The window is the single-process run's with grad_accum x world micro-batches; rank r
        takes its r-th slice, normalised by the whole window's count, and the ranks' summed
        gradients and losses are that run's."""
        cfg, g = self.cfg, self.cfg.grad_accum
        window = [self.micro_batch(step * self.accum + k) for k in range(self.accum)]
        num_items = sum(M.count_items(cfg.task, b["labels"]) for b in window)
        mine = window[self.dist.rank * g:(self.dist.rank + 1) * g]
        total = 0.0
        for k, batch in enumerate(mine):
            with self.dist.grad_sync(last=k == g - 1), torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
                loss = self.dist.call(lambda model: M.training_loss(
                    cfg.task, model, batch, num_items, self.compute_dtype, cfg.ce_filter_eps))
                loss.backward()
            total += float(loss.detach())
        return self.dist.sum(total), sum(int(b["attention_mask"].sum()) for b in window)

    def update(self) -> tuple[float, float]:
        """Clip, step the optimizer and scheduler; returns (grad norm, lr of this step)."""
        lr = self.optimizer.param_groups[0]["lr"]
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params],
                                              self.cfg.max_grad_norm or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.dist.value(norm)), lr

    def loop(self):
        cfg, st = self.cfg, self.state
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=st.step, desc="finetune", unit="step",
                   disable=not (cfg.progress and self.is_main), dynamic_ncols=True)
        window_tokens, window_seconds = 0, 0.0  # throughput since the last log line
        with bar, stop_requests() as stop:
            while st.step < self.total_steps and not st.stopped_early:
                rng, updating = rng_state(), False
                t0 = time.perf_counter()
                try:
                    loss, tokens = self.accumulate(st.step)
                    updating = True
                    norm, lr = self.update()
                except KeyboardInterrupt:
                    # a second Ctrl-C, weights half updated, or other ranks mid-collective
                    if stop or updating or self.dist.world > 1:
                        log.warning("aborted in step %d without a checkpoint", st.step + 1)
                        raise
                    self.optimizer.zero_grad(set_to_none=True)  # back to the step's start
                    set_rng_state(rng)
                    raise self.interrupted(signal.SIGINT) from None
                dt = time.perf_counter() - t0
                st.step += 1
                st.losses.append(loss)
                st.grad_norms.append(norm)
                st.tokens += tokens
                st.train_seconds += dt
                window_tokens, window_seconds = window_tokens + tokens, window_seconds + dt
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:.0f}")
                new_best = cfg.eval_every and (st.step % cfg.eval_every == 0
                                               or st.step == self.total_steps) \
                    and self.evaluate_during_training()
                if st.step % cfg.log_every == 0 or st.step == self.total_steps or st.stopped_early:
                    self.log_metrics(lr)
                    self.append_timing(dict(step=st.step, tokens_per_s=window_tokens
                                            / max(window_seconds, 1e-9)))
                    window_tokens, window_seconds = 0, 0.0
                if self.dist.any(bool(stop)):  # every rank stops at this same step; one
                    # that got no signal itself stops as torchrun's forwarded SIGTERM would
                    raise self.interrupted(stop[0] if stop else signal.SIGTERM)
                if (new_best and cfg.load_best_at_end) or (
                        cfg.save_every and st.step % cfg.save_every == 0):
                    self.save_checkpoint()  # a new best is kept for --load-best-at-end
        self.save_checkpoint()  # the final one: --resume --max-steps N extends the run

    def interrupted(self, signum: int) -> Interrupted:
        path = self.save_checkpoint()
        log.warning("interrupted after step %d: checkpoint %s; continue with --resume",
                    self.state.step, path)
        return Interrupted(signum, path)

    def log_metrics(self, lr: float):
        """One metrics.jsonl line, computed only from what a checkpoint holds."""
        st = self.state
        since = st.metrics[-1]["step"] if st.metrics else 0
        window = st.losses[since:]
        st.metrics.append(dict(
            step=st.step, epoch=self.epoch(), loss=sum(window) / len(window), lr=lr,
            grad_norm=st.grad_norms[-1], tokens=st.tokens))
        self.write_metrics()
        self.log_scalars("train", dict(loss=st.metrics[-1]["loss"], lr=lr,
                                       grad_norm=st.grad_norms[-1]))

    def epoch(self) -> float:
        return self.state.step * self.accum / self.batches_per_epoch

    # ------------------------------------------------------------------ outputs
    def write_metrics(self):
        """Training lines and --eval-every lines by step (training first at a step)."""
        st = self.state
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "w") as f:
            for m in sorted(st.metrics + st.evals, key=lambda m: (m["step"], "loss" not in m)):
                f.write(json.dumps(m) + "\n")

    def append_timing(self, line: dict):
        """timing.jsonl: wall-clock numbers, not reproducible, so not in metrics.jsonl."""
        if not self.is_main:
            return
        with open(self.out / TIMING_NAME, "a") as f:
            f.write(json.dumps(line) + "\n")

    def log_scalars(self, prefix: str, values: dict):
        """--report-to tensorboard: prefix/name scalars at the current step."""
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{prefix}/{name}", value, self.state.step)

    def save_checkpoint(self) -> Path:
        """At a step boundary only: weights, optimizer, scheduler, RNG and state of now.
        Every rank takes part (full states are gathered, RNG states are per rank); rank 0
        writes, and no rank goes on before the checkpoint is complete."""
        st = self.state
        final = self.out / f"{CHECKPOINT_PREFIX}{st.step:07d}"
        payload = dict(
            trainable=self.trainable_state(), optimizer=self.dist.optimizer_state(self.optimizer),
            scheduler=self.scheduler.state_dict(), rng=self.dist.gather(rng_state()),
            state=vars(st).copy(), config=self.stored_config())
        if self.is_main and not final.exists():
            tmp = self.out / f".tmp-{CHECKPOINT_PREFIX}{st.step:07d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_checkpoint_files(tmp, payload)
            os.rename(tmp, final)  # the commit point: a checkpoint-* directory is complete
            best = None if st.best_step is None else f"{CHECKPOINT_PREFIX}{st.best_step:07d}"
            for old in sorted(self.out.glob(CHECKPOINT_PREFIX + "*"))[:-KEEP_CHECKPOINTS]:
                if old.name != best:  # --load-best-at-end reads it back
                    shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return final

    def load_checkpoint(self, ckpt: dict):
        path = ckpt["path"]
        params = dict(self.params)
        missing = set(params) ^ set(ckpt["trainable"])
        if missing:
            raise ValueError(f"{path}: trainable parameters differ from this run's model "
                             f"(e.g. {sorted(missing)[:3]}); was it made with another config?")
        self.dist.load_trainable(self.params, ckpt["trainable"])
        self.dist.load_optimizer(self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(**ckpt["state"])
        rng = ckpt["rng"]  # one state per rank (older checkpoints: one state)
        set_rng_state(rng[self.dist.rank] if isinstance(rng, list) else rng)
        if ckpt["config"].get("eval_data") != self.stored_config()["eval_data"]:
            log.warning("--resume with another --eval-data: no 'before' evaluation to compare")
            self.state.eval_before = None

    def save_outputs(self, evals: dict):
        cfg, out = self.cfg, self.out
        full = self.trainable_state() if self.dist.fsdp else None  # gathered by every rank
        if not self.is_main:
            return
        if cfg.method == "lora":
            from pyengine.lora import save_adapter
            save_adapter(self.model, str(out))
            self.add_heads_to_adapter(out)
            if self.labels is not None:  # the class names, beside the adapter's head
                (out / M.LABELS_NAME).write_text(json.dumps(dict(
                    id2label=dict(enumerate(self.labels)),
                    label2id={n: i for i, n in enumerate(self.labels)}), indent=2) + "\n")
        else:
            self.model.save_pretrained(out, state_dict=full)
        self.tokenizer.save_pretrained(out)
        self.write_metrics()
        self.write_config_and_evals(evals)
        plot_losses(self.state.losses, out / "loss.png")
        if cfg.merge:
            self.write_merged(out / "merged", full)

    def write_config_and_evals(self, evals: dict):
        with open(self.out / "config.yaml", "w") as f:  # reusable as --config for a new run
            yaml.safe_dump({k: v for k, v in self.cfg.to_dict().items()
                            if k not in ("resume", "overwrite")}, f, sort_keys=False)
        with open(self.out / "eval.json", "w") as f:
            json.dump(evals, f, indent=2)

    def add_heads_to_adapter(self, out: Path):
        """The fully trained task head goes into the adapter the PEFT way: weights under
        base_model.model.<head>.<param>, listed in adapter_config's modules_to_save."""
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["task_type"] = next(k for k, v in M.TASK_TYPES.items() if v == self.cfg.task)
        if self.heads:
            from safetensors.torch import load_file, save_file
            weights_path = out / "adapter_model.safetensors"
            weights = load_file(weights_path)
            for name in self.heads:
                for key, p in self.model.get_submodule(name).named_parameters():
                    weights[f"base_model.model.{name}.{key}"] = p.detach().float().contiguous()
            save_file(weights, weights_path, metadata={"format": "pt"})
            config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []) | set(self.heads))
        config_path.write_text(json.dumps(config, indent=2))

    def write_merged(self, path: Path, trained: dict | None = None):
        """Base weights in fp32 (LoRA bases dequantized from --quant, as trained) + the trained
        weights, LoRA merged, as a plain HF directory."""
        model = M.load_model(self.cfg.model, self.cfg.task, self.labels,
                             self.tokenizer.pad_token_id)
        if self.cfg.method == "lora":
            from pyengine.lora import apply_lora, merge_lora
            apply_lora(model, r=self.cfg.lora_r, alpha=self.cfg.lora_alpha,
                       dropout=self.cfg.lora_dropout, target_modules=self.cfg.target_modules,
                       rslora=self.cfg.rslora, quant=_quant_format(self.cfg))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in (trained or dict(self.params)).items():
                params[n].copy_(p.float())
        if self.cfg.method == "lora":
            merge_lora(model)
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------ run
    def open_output(self):
        cfg = self.cfg
        if cfg.overwrite and self.out.exists():
            log.warning("--overwrite: clearing %s", self.out)
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / RUN_MARKER).write_text("a pyengine.finetune output directory\n")

    def __call__(self) -> dict:
        try:
            return self.train_and_report()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def train_and_report(self) -> dict:
        cfg = self.cfg
        self.dist.barrier()  # every rank validated its inputs and read the checkpoint
        if self.is_main:
            self.open_output()
            for stale in self.out.glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # a save killed midway
                shutil.rmtree(stale, ignore_errors=True)
        if self.checkpoint is not None:
            self.load_checkpoint(self.checkpoint)
            log.info("resumed from %s at step %d", self.checkpoint["path"], self.state.step)
        else:
            self.state.eval_before = self.evaluate()
        st = self.state
        if cfg.report_to == "tensorboard" and self.is_main:  # a resumed run replaces what
            self.tensorboard = summary_writer_class()(      # was logged after its checkpoint
                str(self.out / "tensorboard"), purge_step=st.step + 1 if st.step else None)
        log.info("training %s (%s, %s) on %d %s for %d steps", cfg.model, cfg.task,
                 cfg.method, len(self.train), "rows" if cfg.packing else "examples",
                 self.total_steps)
        self.last_eval = (None, None)
        self.loop()
        if cfg.load_best_at_end:
            self.load_best()
        step, report = self.last_eval
        eval_after = report if step == st.step and not cfg.load_best_at_end else self.evaluate()
        evals = dict(before=st.eval_before, after=eval_after)
        if st.best_step is not None:
            evals["best"] = dict(step=st.best_step, metric=cfg.metric_for_best,
                                 value=st.best_metric, loaded=cfg.load_best_at_end,
                                 stopped_early=st.stopped_early)
        if self.test is not None:
            evals["test"] = self.evaluate(self.test)
        self.save_outputs(evals)
        result = dict(output=str(self.out), steps=st.step, losses=list(st.losses),
                      eval_before=st.eval_before, eval_after=eval_after,
                      best=evals.get("best"), eval_test=evals.get("test"),
                      tokens_seen=st.tokens, tokens_per_s=st.tokens / max(st.train_seconds, 1e-9),
                      train_seconds=st.train_seconds,
                      trainable_params=sum(p.numel() for _, p in self.params),
                      truncated=self.train.truncated)
        log.info(summary(result, cfg.task))
        return result


# --------------------------------------------------------------------------- helpers
def use_kernels(model, ce_filter_eps=None):
    """Fused norms / RoPE / SwiGLU / attention / causal-LM loss on this instance
    (pyengine.patch); a family it does not cover runs HF's own modules."""
    try:
        patch(model, lora=False, ce_filter_eps=ce_filter_eps)
    except ValueError as e:
        log.warning("%s", e)


def _quant_format(cfg) -> str | None:
    return None if cfg.quant == "none" else cfg.quant


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate())


def set_rng_state(rng: dict):
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])


@contextlib.contextmanager
def stop_requests():
    """While training, SIGINT / SIGTERM only ask the loop to stop at the next step boundary
    (the list yielded gets the signal number); a second Ctrl-C raises KeyboardInterrupt at
    once.  The previous handlers come back afterwards.  Main thread only (Python's rule);
    elsewhere nothing is installed."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("signal %d: stopping after this step (Ctrl-C again to abort)", signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: set outside Python


def write_checkpoint_files(directory: Path, payload: dict):
    torch.save(payload, directory / "state.pt")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's payload, loaded with torch.load(weights_only=True): tensors and plain
    containers only, never arbitrary pickled objects."""
    try:
        ckpt = torch.load(path / "state.pt", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path / 'state.pt'}: not a pyengine checkpoint: "
                         f"{M.first_line(e)}") from None
    return dict(ckpt, path=path)


def config_changes(old: dict, new: dict, resumable=RESUMABLE_CHANGES
                   ) -> list[tuple[str, object, object]]:
    """(key, old, new) for every key that differs and alters training (a key missing in
    an older checkpoint's config had its default)."""
    def was(k):
        return old.get(k, FIELDS[k].default if k in FIELDS else STORED_DEFAULTS.get(k))
    return [(k, was(k), v) for k, v in new.items() if k not in resumable and was(k) != v]


def summary_writer_class():
    """torch's TensorBoard SummaryWriter; a ValueError when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--report-to tensorboard needs the tensorboard package (pip install "
                         "tensorboard, or pyengine[tensorboard])") from None
    return SummaryWriter


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_output(cfg: FinetuneConfig):
    """--output must be a directory that is not, inside or above the model or the data,
    and empty unless --resume or --overwrite."""
    out = Path(cfg.output).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {cfg.output} is an existing file (pass a directory)")
    inputs = [("model directory", Path(cfg.model).resolve())] + [
        (f"{key} {'directory' if key == 'adapter' else 'file'}", Path(getattr(cfg, key)).resolve())
        for key in ("data", "eval_data", "test_data", "adapter") if getattr(cfg, key)]
    if cfg.overwrite:
        inputs.append(("current directory", Path.cwd()))
    for what, path in inputs:
        if out == path or out in path.parents or (what in ("model directory", "adapter directory")
                                                           and path in out.parents):
            raise ValueError(f"--output {cfg.output} overlaps the {what} {path}; choose an "
                             f"output directory outside the inputs")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    listing = f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}"
    if held and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--output {cfg.output} is not empty (holds {listing}); pass --resume "
                         f"to continue that run or --overwrite to replace it")
    if held and cfg.overwrite and not is_run_dir(out):
        raise ValueError(f"--output {cfg.output} holds files that are not a pyengine run "
                         f"({listing}); --overwrite only replaces a run's own directory: "
                         f"choose another --output")


def is_run_dir(out: Path) -> bool:
    """A directory a fine-tune wrote: its marker (or, from older runs, a checkpoint or
    metrics.jsonl) is there."""
    return ((out / RUN_MARKER).is_file() or (out / "metrics.jsonl").is_file()
            or latest_checkpoint(out) is not None)


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in out.glob(CHECKPOINT_PREFIX + "*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def plot_losses(losses: list[float], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_eval(e: dict | None, task: str) -> str:
    if e is None:
        return "n/a"
    if task == "causal-lm":
        return f"loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f}"
    text = f"accuracy {e['accuracy']:.3f}, macro F1 {e['macro_f1']:.3f}, loss {e['loss']:.4f}"
    if task == "token-cls":
        text += f", entity F1 {e['entities']['micro']['f1']:.3f}"
    return text


def _fmt_scores(name: str, s: dict) -> str:
    return (f"    {name:<20} precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
            f"F1 {s['f1']:.3f}  support {s['support']}")


def report_text(e: dict, task: str) -> str:
    """A full evaluation report: the totals, then per class (and per entity type)."""
    lines = [_fmt_eval(e, task)]
    if task != "causal-lm":
        lines += [_fmt_scores(name, s) for name, s in e["per_class"].items()]
    if task == "token-cls":
        ent = e["entities"]
        lines += ["  entities:"] + [_fmt_scores(name, s) for name, s in ent["per_type"].items()]
        lines += [_fmt_scores("micro avg", ent["micro"]), _fmt_scores("macro avg", ent["macro"])]
    return "\n".join(lines)


def summary(r: dict, task: str) -> str:
    best = r.get("best")
    return "".join([
        f"done: {r['steps']} steps in {r['train_seconds']:.1f}s "
        f"({r['tokens_per_s']:.0f} tokens/s), {r['trainable_params']:,} trainable params; "
        f"final loss {r['losses'][-1]:.4f}\n",
        f"  eval before: {_fmt_eval(r['eval_before'], task)}\n",
        f"  eval after:  {_fmt_eval(r['eval_after'], task)}\n",
        f"  best: step {best['step']} ({best['metric']} {best['value']:.4f})"
        f"{', stopped early' if best['stopped_early'] else ''}"
        f"{', its weights exported' if best['loaded'] else ''}\n" if best else "",
        f"  test: {report_text(r['eval_test'], task)}\n" if r.get("eval_test") else "",
        f"  outputs in {r['output']}"])


class EvalRun(Run):
    """--eval-only: --model (+ --adapter) evaluated on --eval-data / --test-data into
    OUTPUT/eval.json {"eval": report, "test": report}; nothing is trained."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg, self.out = cfg, Path(cfg.output)
        self.compute_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.dist, self.is_main, self.tensorboard = Dist(), True, None
        if self.dist.world > 1:
            raise ValueError(f"--eval-only evaluates in one process; run it without torchrun "
                             f"(WORLD_SIZE={self.dist.world})")
        M.check_backends()
        check_output(cfg)
        self.tokenizer = M.load_tokenizer(cfg.model)
        task, saved = M.saved_task(cfg.model, cfg.adapter)
        if task not in (None, cfg.task):
            raise ValueError(f"--eval-only: {cfg.adapter or cfg.model} is a {task} model, not "
                             f"--task {cfg.task}")
        self.labels = None
        if cfg.task != "causal-lm":
            self.labels = cfg.labels or saved
            if self.labels is None:
                raise ValueError(f"--eval-only: no class names for {cfg.adapter or cfg.model} "
                                 f"(no labels.json / id2label of a {cfg.task} model); pass "
                                 f"--labels")
        self.load_eval_data()
        seed_everything(cfg.seed)
        self.model = M.load_model(cfg.model, cfg.task, self.labels, self.tokenizer.pad_token_id)
        if cfg.adapter is not None:
            from pyengine.lora import load_adapter
            load_adapter(self.model, cfg.adapter)
        use_kernels(self.model)  # evaluated as a training run evaluates
        self.dist.wrap(self.model, cfg.method)

    def __call__(self) -> dict:
        self.open_output()
        evals = {name: self.evaluate(data) for name, data in (("eval", self.eval),
                                                                ("test", self.test)) if data}
        self.write_config_and_evals(evals)
        for name, e in evals.items():
            log.info("%s: %s", name, report_text(e, self.cfg.task))
        return dict(output=str(self.out), **evals)


def run(config) -> dict:
    """Fine-tune as configured (FinetuneConfig, dict of keys, YAML path, or None for the
    embedded default).  Returns losses, eval before/after, throughput and the output dir."""
    from pyengine.finetune.config import coerce
    from pyengine.finetune.distributed import session
    cfg = coerce(config)
    with session():  # torchrun's process group, when launched by it
        return (EvalRun if cfg.eval_only else Run)(cfg)()
