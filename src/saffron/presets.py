"""Named configurations (``--preset NAME`` on eval, compare and serve): a method's options fixed as a source states.

``paper`` is Saffron-1 as published (paper, "The method", step 5, and the authors' code): the LoRA MRM with EOS in
its unseen mask (``smol-mrm``, trained with ``train-mrm --eos mask``), none of our search heuristics
(``no_repeat_ngram=0 per_parent=0 policy_weight=0 diversity=0``), ``final=first`` (the authors' rule: no
reward-model call after the search), top-p 0.8, and 16 to 32 new tokens for **every** method, so that in a
comparison the baselines answer at the same lengths as Saffron.

A preset fixes values; it does not set defaults to override. An option given beside it that says otherwise is
refused in one line naming both (``--preset paper sets final=first; -o final=rerank contradicts it``), so a
results folder labelled ``paper`` (``config.json`` records ``preset``) never holds a run that was not. Options the
preset leaves open (the budget: ``width``, ``n``, ``simulations``; the reward model) stay the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saffron.errors import SaffronError
from saffron.mrm import EMBEDDED
from saffron.mrm.base import read_manifest


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    every_method: Mapping[str, Any] = field(default_factory=dict)  # options set for every method that has them
    per_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # options of one method
    mrm: str | None = None  # the MRM, for the methods that use one (another must be of the same form)
    mrm_kind: str | None = None  # the form an MRM given instead must have ("lora")
    mrm_eos_in_mask: bool | None = None  # ... and whether its unseen mask must hold EOS


PAPER = Preset(
    name="paper",
    summary="Saffron-1 as published: LoRA MRM smol-mrm (EOS masked), search heuristics off, final=first, "
            "top-p 0.8, 16-32 new tokens for every method",
    every_method={"min_new_tokens": 16, "max_new_tokens": 32},
    per_method={"saffron": {"top_p": 0.8, "final": "first", "no_repeat_ngram": 0, "per_parent": 0,
                            "policy_weight": 0.0, "diversity": 0.0}},
    mrm="smol-mrm",
    mrm_kind="lora",
    mrm_eos_in_mask=True,
)
PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER,)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SaffronError(f"unknown preset '{name}'; known: {', '.join(PRESETS)}") from None


def eval_flag(key: str, value: Any) -> str:
    """How a user set ``key`` on ``saffron eval`` / ``serve``, for the contradiction message."""
    if key in ("max_new_tokens", "top_p", "temperature"):
        return f"--{key.replace('_', '-')} {value}"
    return f"-o {key}={value}"


def preset_options(preset: Preset, method: str, names: Collection[str], given: Mapping[str, Any],
                   flag: Callable[[str, Any], str] = eval_flag) -> dict[str, Any]:
    """``given`` (the user's options of ``method``) with the preset's values for ``method``'s options ``names``
    filled in; a given value that differs is refused, named as ``flag`` renders it."""
    fixed = {k: v for k, v in preset.every_method.items() if k in names}
    fixed.update(preset.per_method.get(method, {}))
    out = dict(given)
    for k, v in fixed.items():
        if k in given and given[k] != v:
            raise SaffronError(f"--preset {preset.name} sets {k}={v}; {flag(k, given[k])} contradicts it")
        out[k] = v
    return out


def preset_mrm(preset: Preset, given: str | None, flag: str = "--mrm") -> str | None:
    """The MRM a run under ``preset`` uses: the preset's, or ``given`` if it has the same form (checked from its
    manifest alone, before anything loads). A missing MRM folder is left to the usual check. ``flag``: the option
    that gave ``given``, for the message."""
    if preset.mrm is None:
        return given
    spec = given or preset.mrm

    path = EMBEDDED[spec][0] if spec in EMBEDDED else Path(spec)
    if not path.is_dir():
        return spec
    man = read_manifest(path)
    why = None
    if man is None:
        why = "has no saffron.json"
    elif preset.mrm_kind is not None and man.kind != preset.mrm_kind:
        why = f"is a {man.kind} MRM, not the paper's {preset.mrm_kind} form"
    elif preset.mrm_eos_in_mask is not None and man.corpus.get("eos_in_mask") is not preset.mrm_eos_in_mask:
        why = (f"has eos_in_mask={man.corpus.get('eos_in_mask')} (EOS supervised); the paper keeps EOS in the unseen "
               f"mask: retrain it with `saffron train-mrm --eos mask`")
    if why is not None:
        where = f"{flag} {spec}" if given else f"its MRM {spec}"
        raise SaffronError(f"--preset {preset.name} needs a LoRA MRM with EOS in its unseen mask; {where} {why}")
    return spec
