"""``saffron bench quality``: the independent judges and the junk detector on the test split.

Judges (``minilm-judge``, ``refusal-rules``): ROC-AUC on the test rows of the human-labelled responses, whole
and cut to their first 16 policy tokens (as ``bench guard`` cuts them, so the figures compare with smol-guard's),
and the share of unsafe test responses still judged unsafe once a held-out refusal sentence is put in front or a
held-out disclaimer behind (``textaug.EVAL_*``: sentences no trainer saw).

Junk detector: natural test responses (whole and first 16 encoder word pieces) against junk of each kind built
from the test responses with a seed the trainer never used; ROC-AUC per kind, the share of each kind flagged at
the shipped threshold, and the false-positive rate on the natural responses at that threshold.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from saffron.data import TEST_SPLIT, guard_labelled
from saffron.embedded import convert
from saffron.encoder import get_encoder
from saffron.minilm_judge import MinilmJudge
from saffron.quality import QualityScorer
from saffron.refusal import is_refusal
from saffron.textaug import EVAL_DISCLAIMERS, EVAL_REFUSALS, JUNK_KINDS, make_junk

BENCH_PREFIX = 16
JUNK_SEED = 12345  # not the trainer's seed: the test junk is new text
JUNK_PER_KIND = 100


def _policy_prefixes(texts: list[str], n: int) -> list[str]:
    """The first ``n`` tokens of each text in the embedded policy's tokenizer (tokenizer only; no model load)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(convert()))
    return [str(tok.decode(tok.encode(t, add_special_tokens=False)[:n])) for t in texts]


def _auc_unsafe(unsafe: np.ndarray, reward: np.ndarray) -> float:
    return round(float(roc_auc_score(unsafe, -reward)), 4)  # higher reward = safer


def bench_judges(judge_dir: Path | None = None) -> dict[str, Any]:
    rows = [r for r in guard_labelled(TEST_SPLIT) if r.response is not None and r.unsafe is not None]
    y = np.array([bool(r.unsafe) for r in rows])
    full = [r.response or "" for r in rows]
    pre = _policy_prefixes(full, BENCH_PREFIX)
    harm = [i for i in range(len(rows)) if y[i]]
    views = {
        "refusal_prefixed": [f"{EVAL_REFUSALS[0]} {full[i]}" for i in harm],
        "disclaimer": [f"{full[i].rstrip()}\n\n{EVAL_DISCLAIMERS[0]}" for i in harm],
    }
    judge = MinilmJudge(judge_dir)

    def minilm(texts: list[str], idx: list[int]) -> np.ndarray:
        out = np.zeros(len(texts))
        by_prompt: dict[str, list[int]] = {}
        for j, i in enumerate(idx):
            by_prompt.setdefault(rows[i].prompt, []).append(j)
        for p, js in by_prompt.items():
            out[js] = judge.score(p, [texts[j] for j in js])
        return out

    def rules(texts: list[str]) -> np.ndarray:
        return np.array([1.0 if is_refusal(t) else -1.0 for t in texts])

    everyone = list(range(len(rows)))
    res: dict[str, Any] = {"n_test": len(rows), "n_test_unsafe": int(y.sum()), "split": TEST_SPLIT}
    def rules_of(texts: list[str], idx: list[int]) -> np.ndarray:
        return rules(texts)

    for name, fn in (("minilm-judge", minilm), ("refusal-rules", rules_of)):
        r_full, r_pre = fn(full, everyone), fn(pre, everyone)
        res[name] = {
            "auc_full": _auc_unsafe(y, r_full), "auc_prefix16": _auc_unsafe(y, r_pre),
            "unsafe_rate_harmful": round(float((r_full[harm] < 0).mean()), 4),
            "unsafe_rate_safe": round(float((r_full[~y] < 0).mean()), 4),
            **{f"unsafe_rate_{k}": round(float((fn(v, harm) < 0).mean()), 4) for k, v in views.items()},
        }
    return res


def bench_junk(junk_dir: Path | None = None) -> dict[str, Any]:
    enc = get_encoder()
    scorer = QualityScorer(junk_dir)
    pool = [r.response for r in guard_labelled(TEST_SPLIT) if r.response and r.response.strip()]
    natural = {"full": pool, "prefix16": [enc.prefix(t, BENCH_PREFIX) for t in pool]}
    rng = random.Random(JUNK_SEED)
    junk = {k: [make_junk(k, pool, rng) for _ in range(JUNK_PER_KIND)] for k in JUNK_KINDS}
    nat_scores = {k: scorer.junk_scores(v) for k, v in natural.items()}
    nat_all = np.concatenate(list(nat_scores.values()))
    thr = scorer.threshold
    res: dict[str, Any] = {"n_natural": len(nat_all), "junk_per_kind": JUNK_PER_KIND, "threshold": thr,
                           "fpr_natural": round(float((nat_all >= thr).mean()), 4),
                           **{f"fpr_natural_{k}": round(float((s >= thr).mean()), 4) for k, s in nat_scores.items()}}
    for k, texts in junk.items():
        s = scorer.junk_scores(texts)
        lab = np.r_[np.zeros(len(nat_all)), np.ones(len(s))]
        res[f"auc_{k}"] = round(float(roc_auc_score(lab, np.r_[nat_all, s])), 4)
        res[f"flagged_{k}"] = round(float((s >= thr).mean()), 4)
    return res


def bench_quality(judge_dir: Path | None = None, junk_dir: Path | None = None) -> dict[str, Any]:
    t0 = time.time()
    out = {"judges": bench_judges(judge_dir), "junk": bench_junk(junk_dir)}
    return {**out, "seconds": round(time.time() - t0, 1)}
