"""Evaluation during training: the numbers an evaluation adds to metrics.jsonl, the best
step by --metric-for-best, and early stopping (HF Trainer's rule: an evaluation that does
not beat the best by more than --early-stopping-threshold uses up one unit of patience)."""
from __future__ import annotations

from pyengine.finetune.config import METRICS


def scalars(task: str, report: dict) -> dict:
    """The values --metric-for-best can name, from a models.evaluate report."""
    if task == "causal-lm":
        return dict(loss=report["loss"], perplexity=report["perplexity"])
    values = dict(loss=report["loss"], accuracy=report["accuracy"], macro_f1=report["macro_f1"])
    if task == "token-cls":
        values["f1"] = report["entities"]["micro"]["f1"]
    return values


def track(state, cfg, values: dict) -> bool:
    """Record one evaluation at state.step in state (best step / value, evaluations
    without improvement, stopped_early); True when it is the new best."""
    value, best = values[cfg.metric_for_best], state.best_metric
    greater = METRICS[cfg.task][cfg.metric_for_best]
    better = best is None or (value > best if greater else value < best)
    if best is None or (better and abs(value - best) > cfg.early_stopping_threshold):
        state.bad_evals = 0
    else:
        state.bad_evals += 1
    if better:
        state.best_metric, state.best_step = value, state.step
    if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
        state.stopped_early = True
    return better
