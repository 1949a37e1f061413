"""Decoding methods (defences), one module each, dispatched by name through ``METHODS``."""

from __future__ import annotations

from saffron.errors import SaffronError
from saffron.methods.base import Method, MethodResult, Stack
from saffron.methods.best_of_n import BestOfN
from saffron.methods.deal_mcts import DealMcts
from saffron.methods.grids import GRID_SIZE, TUNING_GRIDS
from saffron.methods.none import NoDefence
from saffron.methods.rebase import Rebase
from saffron.methods.rejection import Rejection
from saffron.methods.saffron import Saffron

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (NoDefence, BestOfN, Rejection, Rebase, DealMcts, Saffron)
}


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise SaffronError(f"unknown method '{name}'; known: {', '.join(METHODS)}") from None


__all__ = ["GRID_SIZE", "METHODS", "TUNING_GRIDS", "Method", "MethodResult", "Stack", "get_method"]
