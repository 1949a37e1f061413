"""Loading any reward model by spec: the guards (``smol_guard.py``, ``llama_guard.py``) and the head PRM
(``mrm/prm.py``). The base classes (``base.py``) know none of them, so an implementation can import its base
without a cycle; ``guards/__init__`` does not import this module for the same reason.
"""

from __future__ import annotations

from pathlib import Path

from saffron.errors import SaffronError
from saffron.guards.base import RewardModel
from saffron.guards.llama_guard import LLAMA_GUARD_3_1B, load_llama_guard
from saffron.guards.smol_guard import load_smol_guard, load_zero_shot
from saffron.mrm.prm import load_head_prm

GUARDS = ("smol-guard", "smol-guard-zeroshot", "llama-guard-3", "head-prm")
GUARD_SPECS = "smol-guard, smol-guard-zeroshot, llama-guard-3[:PATH], head-prm[:PATH]"


def load_guard(spec: str = "smol-guard") -> RewardModel:
    """``smol-guard`` (embedded), ``smol-guard-zeroshot``, ``llama-guard-3`` or ``llama-guard-3:PATH_OR_ID``, or
    ``head-prm[:PATH]``: a value head on the policy's states (``mrm/prm.py``; embedded one without PATH)."""
    check_guard_spec(spec)
    name, _, arg = spec.partition(":")
    if name == "smol-guard":
        return load_smol_guard(arg or None)
    if name == "smol-guard-zeroshot":
        return load_zero_shot()
    if name == "head-prm":
        return load_head_prm(arg or None)
    return load_llama_guard(arg or LLAMA_GUARD_3_1B)


def check_guard_spec(spec: str) -> None:
    """Refuse an unknown guard, or a head PRM path that is no folder, before anything loads."""
    name, _, arg = spec.partition(":")
    if name not in GUARDS:
        raise SaffronError(f"unknown guard '{spec}'; known: {GUARD_SPECS}")
    if name == "head-prm" and arg and not Path(arg).is_dir():
        raise SaffronError(f"head PRM '{arg}' is not a folder; train one with `saffron train-mrm --kind prm --data "
                           f"REWARDS --out {arg}`")
