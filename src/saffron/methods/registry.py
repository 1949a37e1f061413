"""Methods by name: ``METHODS`` and what reads a method's options through it (the same shape as
``guards/registry.py`` and ``mrm/registry.py``: a registry module imports the implementations; no base does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saffron.errors import SaffronError
from saffron.methods.base import Method
from saffron.methods.best_of_n import BestOfN
from saffron.methods.deal_mcts import DealMcts
from saffron.methods.none import NoDefence
from saffron.methods.options import option_default as _option_default
from saffron.methods.options import option_names as _option_names
from saffron.methods.rebase import Rebase
from saffron.methods.rejection import Rejection
from saffron.methods.saffron import Saffron

METHODS: dict[str, type[Method[Any]]] = {
    m.name: m for m in (NoDefence, BestOfN, Rejection, Rebase, DealMcts, Saffron)
}


def get_method(name: str) -> type[Method[Any]]:
    try:
        return METHODS[name]
    except KeyError:
        raise SaffronError(f"unknown method '{name}'; known: {', '.join(METHODS)}") from None


def option_names(method: str) -> list[str]:
    """Every option of ``method`` (its own first, then the shared lengths)."""
    return _option_names(get_method(method).options_type)


def option_default(method: str, option: str) -> Any:
    return _option_default(get_method(method).options_type, option)


def make_method(method: str, options: Mapping[str, Any]) -> Method[Any]:
    """``method`` configured with ``options`` (user input): an unknown or ill-typed option is one line naming the
    option and the method."""
    cls = get_method(method)
    return cls(cls.options_type.from_dict(options))
