"""The ablation table (``saffron ablate``, issue 13): which part of Saffron buys how much, in one place.

Each row is one configuration, run by ``saffron compare`` as a row of its own (its ``key``, a method or a variant
``method@label``), all at the matched compute on the same dev prompts. Saffron's rows walk from the paper's form to
our default one change at a time (``parent``: the row it changes one thing from): the paper's form with its LoRA
MRM; the same search with the head MRM; each search heuristic alone on top of that; the reward model's final rerank
alone; the full default. The baselines each run twice, with the guard as their reward model and with the cheap head
PRM, so that "multifurcation" and "a cheap learned value" are not confounded.

Values are not repeated here: the paper's form is ``presets.PAPER``'s Saffron options, and each heuristic "on" is
its default in ``SaffronOptions`` (so a changed default changes the row, and the table says so in ``why``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from saffron.methods import option_default
from saffron.presets import PAPER


@dataclass(frozen=True)
class AblationRow:
    """One row of the ablation table.

    ``key``: the row's name in compare (its point folders, its row in ``comparison.json``). ``why``: what the row
    isolates, printed beside it. ``options``: the method's options besides the budget. ``mrm``: which MRM the row
    searches with (``lora`` or ``head``: ``AblateConfig.lora_mrm`` / ``head_mrm``; None for a method without one).
    ``reward``: its search-time reward model (``guard``: the run's ``--reward``; ``prm``: the head PRM; None when the
    row calls none). ``parent``: the row this one changes one thing from (None: a reference row)."""

    key: str
    why: str
    options: Mapping[str, Any] = field(default_factory=dict)
    mrm: Literal["lora", "head"] | None = None
    reward: Literal["guard", "prm"] | None = None
    parent: str | None = None


PAPER_KEY = "saffron@paper"
HEAD_KEY = "saffron@head"
PAPER_OPTIONS: Mapping[str, Any] = dict(PAPER.per_method["saffron"])
HEURISTICS = ("no_repeat_ngram", "per_parent", "policy_weight")


def _on(option: str) -> dict[str, Any]:
    """The paper's options with ``option`` at Saffron's default (on)."""
    return {**PAPER_OPTIONS, option: option_default("saffron", option)}


ABLATION: tuple[AblationRow, ...] = (
    AblationRow("none", "the undefended policy, greedy: what every defence is measured against"),
    AblationRow(PAPER_KEY, "Saffron-1 as published (--preset paper): LoRA MRM with EOS masked, search heuristics off, "
                "final=first", PAPER_OPTIONS, mrm="lora"),
    AblationRow(HEAD_KEY, "the paper's search with the head MRM (policy's hidden states; it supervises EOS) instead "
                "of the LoRA MRM", PAPER_OPTIONS, mrm="head", parent=PAPER_KEY),
    *(AblationRow(f"saffron@{h.replace('_', '-')}", f"+ {h}={option_default('saffron', h)} alone (our default) on "
                  "the head-MRM paper search", _on(h), mrm="head", parent=HEAD_KEY) for h in HEURISTICS),
    AblationRow("saffron@rerank", f"+ final={option_default('saffron', 'final')} alone: the reward model reranks the "
                "surviving beam", _on("final"), mrm="head", reward="guard", parent=HEAD_KEY),
    AblationRow("saffron", "the full default: head MRM, every heuristic, the rerank", {}, mrm="head",
                reward="guard", parent=HEAD_KEY),
    AblationRow("best-of-n", "Best-of-N with the guard as its reward model", reward="guard"),
    AblationRow("best-of-n@head-prm", "Best-of-N with the cheap head PRM as its reward model", reward="prm",
                parent="best-of-n"),
    AblationRow("rebase", "Rebase with the guard as its reward model", reward="guard"),
    AblationRow("rebase@head-prm", "Rebase with the cheap head PRM as its reward model", reward="prm",
                parent="rebase"),
)
ROWS: dict[str, AblationRow] = {r.key: r for r in ABLATION}
