"""Loading any reward model by spec (``NAME[:ARG]``): the guards (``smol_guard.py``, ``llama_guard.py``) and the
head PRM (``mrm/prm.py``), by name in ``GUARDS`` (the same shape as ``methods.METHODS`` and ``data.LOADERS``).
The base classes (``base.py``) know none of them, so an implementation can import its base without a cycle;
``guards/__init__`` does not import this module for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from saffron.errors import SaffronError
from saffron.guards.base import RewardModel
from saffron.guards.llama_guard import LLAMA_GUARD_3_1B, load_llama_guard
from saffron.guards.smol_guard import load_smol_guard, load_zero_shot
from saffron.mrm.prm import load_head_prm


@dataclass(frozen=True)
class GuardLoader:
    """How one guard name loads: ``load`` receives the spec's text after ':' ("" when it has none)."""

    load: Callable[[str], RewardModel]
    path: bool = False  # named NAME[:PATH] among the known guards: the text after ':' is a folder or hub id


GUARDS: dict[str, GuardLoader] = {
    "smol-guard": GuardLoader(lambda arg: load_smol_guard(arg or None)),
    "smol-guard-zeroshot": GuardLoader(lambda _: load_zero_shot()),
    "llama-guard-3": GuardLoader(lambda arg: load_llama_guard(arg or LLAMA_GUARD_3_1B), path=True),
    "head-prm": GuardLoader(lambda arg: load_head_prm(arg or None), path=True),
}
GUARD_SPECS = ", ".join(name + ("[:PATH]" if g.path else "") for name, g in GUARDS.items())


def load_guard(spec: str = "smol-guard") -> RewardModel:
    """``smol-guard`` (embedded), ``smol-guard-zeroshot``, ``llama-guard-3`` or ``llama-guard-3:PATH_OR_ID``, or
    ``head-prm[:PATH]``: a value head on the policy's states (``mrm/prm.py``; embedded one without PATH)."""
    check_guard_spec(spec)
    name, _, arg = spec.partition(":")
    return GUARDS[name].load(arg)


def check_guard_spec(spec: str) -> None:
    """Refuse an unknown guard, or a head PRM path that is no folder, before anything loads."""
    name, _, arg = spec.partition(":")
    if name not in GUARDS:
        raise SaffronError(f"unknown guard '{spec}'; known: {GUARD_SPECS}")
    if name == "head-prm" and arg and not Path(arg).is_dir():
        raise SaffronError(f"head PRM '{arg}' is not a folder; train one with `saffron train-mrm --kind prm --data "
                           f"REWARDS --out {arg}`")
