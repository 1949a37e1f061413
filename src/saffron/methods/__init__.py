"""Decoding methods (defences), one module each, dispatched by name through ``METHODS`` (``registry.py``).

A method's options are its ``options_type`` dataclass (``methods/options.py``): ``option_names``,
``option_default`` and ``make_method`` read everything from there, so no caller repeats a name or a default.
"""

from __future__ import annotations

from saffron.methods.base import Method, MethodResult, RunContext, Stack
from saffron.methods.grids import GRID_SIZE, TUNING_GRIDS
from saffron.methods.options import MethodOptions
from saffron.methods.registry import METHODS, get_method, make_method, option_default, option_names

__all__ = ["GRID_SIZE", "METHODS", "TUNING_GRIDS", "Method", "MethodOptions", "MethodResult", "RunContext", "Stack",
           "get_method", "make_method", "option_default", "option_names"]
