"""``saffron bench guard``: how well smol-guard separates safe from unsafe responses it never trained on.

On the test split of the human-labelled responses (near-duplicate clusters, see ``splits.py``): ROC-AUC of the
trained probe on full responses and on their first 16 tokens, the untrained backbone's zero-shot logit(' safe') -
logit(' unsafe'), and a TF-IDF + logistic-regression baseline fitted on the same train rows and views (a guard a
bag of words beats is no guard).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from saffron.data import TEST_SPLIT, TRAIN_SPLIT, Example, guard_labelled
from saffron.guards.base import single_token
from saffron.guards.smol_guard import ASSET, chat_guard_prompt, load_probe
from saffron.guards.train import PREFIX_TOKENS, guard_features, response_views
from saffron.model import Model, load_model

BENCH_PREFIX = 16


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


def bench_guard(guard_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    t0 = time.time()
    spec, probe = load_probe(guard_dir or ASSET)
    model = load_model(spec.base_model)
    heldout = guard_labelled(TEST_SPLIT)
    train = guard_labelled(TRAIN_SPLIT)
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
        "seconds": round(time.time() - t0, 1),
    }
