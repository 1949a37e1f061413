"""The junk detector's parts (quality.py) without the real encoder: bigram tables, chunk coherence, the exported
trees, cross-fitted training data, saving and loading, and the errors of an old or damaged asset."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from saffron import quality
from saffron.data import Example
from saffron.encoder import Encoder
from saffron.errors import SaffronError
from saffron.quality import (
    COHERENCE_NAMES,
    FEATURE_NAMES,
    LM_NAMES,
    BigramLM,
    QualityScorer,
    Trees,
    chunks,
    coherence,
    junk_dataset,
    load_junk_head,
    train_junk_detector,
)
from saffron.textaug import make_junk

SUBJECTS = ("the farmer", "my neighbour", "the old teacher", "a young doctor", "the river guide", "our team")
VERBS = ("repaired", "painted", "visited", "cleaned", "described", "measured")
OBJECTS = ("the wooden bridge", "a small boat", "the north field", "the school library", "a stone wall")
ENDINGS = ("before the winter came.", "with great care.", "in the early morning.", "for the whole village.")


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(n)]


def responses(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentences(rng.randint(2, 6), seed * 1000 + i)) for i in range(n)]


class FakeEncoder:
    """Bag of hashed words, L2-normalised: texts that share words embed close; no model."""

    dim = 16

    def __init__(self) -> None:
        self.calls = 0

    def prefix(self, text: str, n_tokens: int) -> str:
        return " ".join(text.split()[:n_tokens])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        out[:, 0] += 0.1  # no zero vector
        unit: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
        return unit


def fake_encoder() -> Encoder:
    return cast(Encoder, FakeEncoder())


def test_bigram_lm_prefers_natural_order_and_round_trips(tmp_path: Path) -> None:
    lm = BigramLM.fit(responses(60, 0))
    natural = sentences(1, 99)[0]
    words = natural.split()
    salad = " ".join(reversed(words))
    nat, sal = (dict(zip(LM_NAMES, lm.stats(t), strict=True)) for t in (natural, salad))
    assert nat["lm_mean"] > sal["lm_mean"] and nat["lm_unseen_share"] < sal["lm_unseen_share"]
    assert lm.log_ratios("zebra quokka")[0, 1] == -1  # a pair with an unknown token is neither seen nor unseen
    assert np.all(lm.stats("") == 0) and np.all(np.isfinite(lm.stats("zebra quokka axolotl")))
    lm.save(tmp_path / "lm.safetensors")
    back = BigramLM.load(tmp_path / "lm.safetensors")
    assert back.vocab == lm.vocab
    assert np.array_equal(back.stats(salad), lm.stats(salad))


def test_chunks_cover_the_words() -> None:
    text = " ".join(f"w{i}" for i in range(37))
    cs = chunks(text, k=8)
    assert [len(c.split()) for c in cs] == [8, 8, 8, 13] and " ".join(cs) == text
    assert chunks("one two three four five", k=8) == ["one two", "three four five"]
    assert chunks("one two three", k=8) == []


def test_coherence_sees_a_change_of_topic() -> None:
    enc = fake_encoder()
    same = "apple " * 16 + "apple " * 16
    mixed = "apple " * 16 + "engine " * 16
    texts = [same.strip(), mixed.strip(), "too short"]
    c = dict(zip(COHERENCE_NAMES, coherence(enc, texts, enc.embed(texts)).T, strict=True))
    assert c["chunk_min_cos"][0] > c["chunk_min_cos"][1]
    assert c["chunk_none"].tolist() == [0.0, 0.0, 1.0]


def test_trees_reproduce_scikit_learn_and_round_trip(tmp_path: Path) -> None:
    from sklearn.ensemble import GradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] + 0.3 * rng.normal(size=300)) > 0.2  # needs an interaction: more than one split deep
    w = np.where(y, 2.0, 1.0)  # unbalanced weights: a baseline other than 0
    gb = GradientBoostingClassifier(n_estimators=20, learning_rate=0.1, max_depth=3, random_state=0)
    gb.fit(x, y, sample_weight=w)
    trees = Trees.from_sklearn(gb)
    assert trees.baseline != 0.0
    assert np.allclose(trees(x), gb.decision_function(x), atol=1e-9)
    trees.save(tmp_path / "t.safetensors")
    assert np.array_equal(Trees.load(tmp_path / "t.safetensors")(x), trees(x))


def test_junk_dataset_builds_each_folds_junk_from_its_own_responses() -> None:
    rows = [Example(id=str(i), prompt=f"p{i}", response=r) for i, r in enumerate(responses(40, 1))]
    texts, junk, kinds, fold, parts = junk_dataset(fake_encoder(), rows, seed=0, folds=4, views=2)
    assert sorted(t for p in parts for t in p) == sorted(r.response for r in rows if r.response)
    assert kinds.count("natural") == 80 and int((~junk).sum()) == 80 and set(fold.tolist()) == {0, 1, 2, 3}
    for f, part in enumerate(parts):
        vocab = {w for t in part for w in t.split()}
        spliced = [t for t, k, g in zip(texts, kinds, fold, strict=True) if k == "spliced" and g == f]
        assert spliced and all(set(t.split()) <= vocab for t in spliced)
    again = junk_dataset(fake_encoder(), rows, seed=0, folds=4, views=2)
    assert again[0] == texts


@pytest.fixture
def trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A detector trained on made-up responses with the fake encoder, saved as ``saffron train-junk`` saves."""
    enc = fake_encoder()
    rows = [Example(id=str(i), prompt=f"p{i}", response=r) for i, r in enumerate(responses(60, 2))]
    monkeypatch.setattr(quality, "get_encoder", lambda: enc)
    monkeypatch.setattr(quality, "guard_labelled", lambda split: rows)
    monkeypatch.setattr(quality, "BOOST", {"n_estimators": 30, "learning_rate": 0.1, "max_depth": 3})
    out = tmp_path / "junk"
    meta = train_junk_detector(out, seed=0)
    assert meta["version"] == quality.VERSION and meta["features"] == list(FEATURE_NAMES)
    assert meta["train"]["export_gap"] < 1e-6
    return out


def test_trained_detector_loads_and_scores(trained: Path) -> None:
    assert sorted(p.name for p in trained.iterdir()) == [
        "junk.json", "junk.safetensors", "lm.safetensors", "order.safetensors", "trees.safetensors"]
    q = QualityScorer(trained)
    natural = responses(30, 7)
    rng = random.Random(5)
    salad = [make_junk(k, natural, rng) for k in ("shuffled", "emoji", "repetition") for _ in range(10)]
    s = q.junk_scores(["", "  ", *natural, *salad])
    assert s[0] == s[1] == 1.0 and np.all((s >= 0) & (s <= 1))
    assert s[2 + len(natural):].mean() > s[2:2 + len(natural)].mean()
    assert np.allclose(q.junk_scores(natural[:3]), s[2:5])  # a text's score does not depend on its batch


def test_old_or_damaged_detector_is_one_line_error(trained: Path, tmp_path: Path) -> None:
    meta = json.loads((trained / "junk.json").read_text())
    (trained / "junk.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "version"}))
    old = rf"format version 1; this saffron reads version {quality.VERSION}: retrain"
    with pytest.raises(SaffronError, match=old) as e:
        load_junk_head(trained)
    assert "\n" not in str(e.value)
    # version 2 assets read other feature columns (no longest-word statistic): refused, not misread
    (trained / "junk.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(SaffronError, match=rf"format version 2; this saffron reads version {quality.VERSION}"):
        load_junk_head(trained)
    (trained / "junk.json").write_text(json.dumps(meta))
    (trained / "trees.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SaffronError, match="corrupted"):
        load_junk_head(trained)
    (trained / "trees.safetensors").unlink()
    with pytest.raises(SaffronError, match="no junk detector"):
        load_junk_head(trained)
    with pytest.raises(SaffronError, match="no junk detector"):
        load_junk_head(tmp_path / "nowhere")
