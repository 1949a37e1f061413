"""Helpers the verb modules share: the placement flags, quiet model loading, printing a benchmark, and the parsing of
method options and integer lists."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import typer

from saffron.errors import SaffronError

if TYPE_CHECKING:  # the CLI starts without torch: every verb imports the library inside its body
    from saffron.device import Placement


def place(device: str, dtype: str, runner: str) -> Placement:
    """Check --device/--dtype/--runner and make them the process's placement (device.py), before any model loads:
    a device this machine lacks or a dtype it cannot compute in is one line, and nothing is written."""
    from saffron.device import Placement, resolve_device, resolve_dtype, set_default

    p = Placement(device=device, dtype=dtype, runner=runner).check()
    resolve_dtype(dtype, resolve_device(device))
    set_default(p)
    return p


def quiet_hf() -> None:
    """Silence transformers' warnings and progress bars before a verb loads models (the verbs print results)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    # transformers leaves these two unannotated
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def emit(res: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: as JSON, or one ``name: value`` line each."""
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            typer.echo(f"{k:>24}: {v}")


def int_list(flag: str, text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; anything else is one line naming ``flag``."""
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise SaffronError(f"{flag} must be comma-separated integers, got '{text}'") from None


def single_budgets(method_budgets: list[str], verb: str, key: str) -> dict[str, int]:
    """``--method-budgets KEY=B`` of tune (KEY a method) and ablate (KEY a row): one budget each, by key."""
    budgets: dict[str, int] = {}
    for mb in method_budgets:
        k, sep, b = mb.partition("=")
        bs = int_list("--method-budgets", b) if sep else ()
        if len(bs) != 1:
            raise SaffronError(f"--method-budgets for {verb} expects {key}=B (one budget), got '{mb}'")
        budgets[k.strip()] = bs[0]
    return budgets


def method_options(max_new_tokens: int, temperature: float | None, top_p: float | None,
                   opts: list[str]) -> dict[str, Any]:
    """One method's options from generate's and eval's flags: the length, the sampling flags given, then ``-o``."""
    from saffron.config import parse_options

    out: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        out["temperature"] = temperature
    if top_p is not None:
        out["top_p"] = top_p
    return {**out, **parse_options(opts)}


def options_by_method(opt: list[str], names: tuple[str, ...], verb: str) -> dict[str, dict[str, Any]]:
    """``-o METHOD:KEY=VALUE`` of compare and tune, by method; a method not in ``names`` is refused."""
    from saffron.config import parse_options

    per_method: dict[str, dict[str, Any]] = {}
    for o in opt:
        m, sep, kv = o.partition(":")
        if not sep:
            raise SaffronError(f"--opt for {verb} expects METHOD:KEY=VALUE, got '{o}'")
        per_method.setdefault(m.strip(), {}).update(parse_options([kv]))
    stray = sorted(set(per_method) - set(names))
    if stray:
        raise SaffronError(f"--opt names method '{stray[0]}', which is not in --methods")
    return per_method
