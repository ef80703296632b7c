"""Entity-level scores of token classification, seqeval-style (its default, non-strict mode).

Tags are IOB2 ("B-PER", "I-PER", "O") or plain IO ("PER", "O"): B-X starts a chunk of
type X; I-X continues a chunk of type X and starts one after O or after another type; a
tag without a B-/I- prefix is I- of that type (so IO tags chunk runs of equal tags).
A predicted entity counts only when its type, start and end all equal a gold one.
"""
from __future__ import annotations


def entity_chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) of each chunk in one sentence's tags, end exclusive."""
    chunks, current = [], None  # current: (type, start)
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-") if tag[:2] in ("B-", "I-") else ("I", "", tag)
        inside = tag != "O"
        starts = inside and (prefix == "B" or current is None or current[0] != kind)
        if current is not None and (not inside or starts):
            chunks.append((current[0], current[1], i))
            current = None
        if starts:
            current = (kind, i)
    return chunks


def _scores(tp: int, predicted: int, support: int) -> dict:
    precision = tp / predicted if predicted else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(precision=precision, recall=recall, f1=f1, support=support)


def entity_report(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Per entity type precision / recall / F1 / support (gold entities), their micro
    average (over all entities) and macro average (over the types seen in gold or
    predictions)."""
    if len(gold) != len(predicted):
        raise ValueError(f"entity_report: {len(gold)} gold sentences, {len(predicted)} predicted")
    true_set, pred_set = set(), set()
    for n, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"entity_report: sentence {n} has {len(g)} gold tags, "
                             f"{len(p)} predicted")
        true_set.update((n, *c) for c in entity_chunks(g))
        pred_set.update((n, *c) for c in entity_chunks(p))
    hits = true_set & pred_set
    types = sorted({c[1] for c in true_set | pred_set})
    per_type = {t: _scores(sum(c[1] == t for c in hits), sum(c[1] == t for c in pred_set),
                           sum(c[1] == t for c in true_set)) for t in types}
    macro = {k: sum(s[k] for s in per_type.values()) / len(types) if types else 0.0
             for k in ("precision", "recall", "f1")}
    return dict(micro=_scores(len(hits), len(pred_set), len(true_set)),
                macro=dict(macro, support=len(true_set)), per_type=per_type)
