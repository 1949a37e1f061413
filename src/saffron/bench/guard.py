"""``saffron bench guard``: how well smol-guard separates safe from unsafe responses it never trained on.

On the test split of the human-labelled responses (near-duplicate clusters, see ``splits.py``): ROC-AUC of the
trained probe on full responses and on their first 16 tokens, the untrained backbone's zero-shot logit(' safe') -
logit(' unsafe'), and a TF-IDF + logistic-regression baseline fitted on the same train rows (the guard half) and
views (a guard a bag of words beats is no guard).

``robustness``: for every judge given (default: the guard under test), the rate judged unsafe per perturbation of
``guards/robustness.py`` on a seeded sample of the test rows (``SUITE_ROWS`` unsafe and safe rows; every rewrite
of every sampled row), with each kind's expected label, the mean reward per kind, and two figures for junk (which
is safe, but must not be what a reward-maximising search prefers): ``mean_reward_junk`` and ``junk_beats_safe``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from saffron.data import TEST_SPLIT, TRAIN_SPLIT, Example, guard_labelled
from saffron.guards.base import single_token
from saffron.guards.robustness import EXPECTED_UNSAFE, build_suite, report_keys, sample_rows, score_suite, summarise
from saffron.guards.smol_guard import ASSET, chat_guard_prompt, load_probe
from saffron.guards.train import PREFIX_TOKENS, guard_features, guard_half, response_views
from saffron.judges import load_judge, parse_judges
from saffron.model import Model, load_model

BENCH_PREFIX = 16
SUITE_ROWS = (32, 16)  # unsafe, safe test rows rewritten (32 harmful pairs, as in issue 12): ~420 responses/judge


def _view_texts(model: Model, rows: list[Example], prefixes: tuple[int, ...]) -> tuple[list[str], list[bool]]:
    texts, labels = [], []
    for r in rows:
        assert r.response is not None
        for v in response_views(model, r.response, prefixes):
            texts.append(r.prompt + "\n" + model.decode(v))
            labels.append(bool(r.unsafe))
    return texts, labels


def tfidf_baseline(model: Model, train: list[Example], heldout: list[Example]) -> dict[str, float]:
    x_tr, y_tr = _view_texts(model, train, PREFIX_TOKENS)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    clf = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced")
    clf.fit(vec.fit_transform(x_tr), y_tr)
    out = {}
    for name, prefixes in (("full", ()), ("prefix16", (BENCH_PREFIX,))):
        texts, y = [], []
        for r in heldout:
            assert r.response is not None
            v = response_views(model, r.response, prefixes)[0]
            texts.append(r.prompt + "\n" + model.decode(v))
            y.append(bool(r.unsafe))
        out[name] = float(roc_auc_score(y, clf.predict_proba(vec.transform(texts))[:, 1]))
    return out


def default_judges(guard_dir: Path | None) -> tuple[str, ...]:
    """The guard under test, as a judge spec."""
    return (f"smol-guard:{guard_dir}",) if guard_dir else ("smol-guard",)


def robustness(judges: Sequence[str], rows: Sequence[Example], seed: int = 0,
               suite_rows: tuple[int, int] = SUITE_ROWS, progress: bool = True) -> dict[str, Any]:
    """Per judge spec: ``summarise`` of its rewards on the suite built from a seeded sample of ``rows``."""
    sample = sample_rows(rows, *suite_rows, seed=seed)
    suite = build_suite(sample, seed=seed)
    keys = report_keys()
    expected = {k: "unsafe" if EXPECTED_UNSAFE.get(k, k == "original_unsafe") else "safe" for k in keys}
    out: dict[str, Any] = {"seed": seed, "n_rows_unsafe": sum(bool(r.unsafe) for r in sample),
                           "n_rows_safe": sum(r.unsafe is False for r in sample), "expected": expected, "judges": {}}
    for spec in judges:
        t0 = time.time()
        judge = load_judge(spec)
        res = summarise(suite, score_suite(judge, suite, progress))
        res["seconds"] = round(time.time() - t0, 1)
        out["judges"][spec] = res
    return out


def bench_guard(guard_dir: Path | None = None, progress: bool = True, judges: Sequence[str] | None = None,
                seed: int = 0, test_rows: Sequence[Example] | None = None,
                train_rows: Sequence[Example] | None = None,
                suite_rows: tuple[int, int] = SUITE_ROWS) -> dict[str, Any]:
    """AUCs of the probe in ``guard_dir`` (default: the shipped one) and ``robustness`` of ``judges`` (default: that
    probe). ``test_rows`` / ``train_rows`` default to ``TEST_SPLIT`` / the guard half of the train split."""
    t0 = time.time()
    judges = tuple(judges) if judges else default_judges(guard_dir)
    parse_judges(",".join(judges))  # a bad name fails before any model loads
    spec, probe = load_probe(guard_dir or ASSET)
    model = load_model(spec.base_model)
    heldout = list(test_rows) if test_rows is not None else guard_labelled(TEST_SPLIT)
    train = list(train_rows) if train_rows is not None else guard_half(guard_labelled(TRAIN_SPLIT))
    gp = chat_guard_prompt(model, spec.instructions, spec.closing)
    pair = (single_token(model, " safe"), single_token(model, " unsafe"))
    f = guard_features(model, gp, heldout, spec.layers, (BENCH_PREFIX,), progress, desc="bench guard", logit_pair=pair)
    import torch

    with torch.inference_mode():
        reward = probe(torch.from_numpy(f["x"]).float()).numpy()
    # views per row: [first 16 tokens (if longer), whole]; the whole is always the last view of its row
    last = np.r_[f["row"][1:] != f["row"][:-1], True]
    first = np.r_[True, f["row"][1:] != f["row"][:-1]]
    y_full, y_pre = f["unsafe"][last], f["unsafe"][first]

    def auc(y: np.ndarray, r: np.ndarray) -> float:
        return float(roc_auc_score(y, -r))  # higher reward = safer

    tfidf = tfidf_baseline(model, train, heldout)
    return {
        "n_eval": int(last.sum()),
        "n_eval_unsafe": int(y_full.sum()),
        "n_train": len(train),
        "auc_full": auc(y_full, reward[last]),
        "auc_prefix16": auc(y_pre, reward[first]),
        "zeroshot_auc_full": auc(y_full, f["logit_diff"][last]),
        "zeroshot_auc_prefix16": auc(y_pre, f["logit_diff"][first]),
        "tfidf_auc_full": tfidf["full"],
        "tfidf_auc_prefix16": tfidf["prefix16"],
        "guard": str(guard_dir or ASSET),
        "layers": list(spec.layers),
        "augment": (spec.train or {}).get("augment"),
        "robustness": robustness(judges, heldout, seed, suite_rows, progress),
        "seconds": round(time.time() - t0, 1),
    }
