"""``saffron mrm ...``: what an MRM folder holds."""

from __future__ import annotations

from pathlib import Path

import typer

from saffron.cli.common import emit
from saffron.cli.options import AS_JSON


def mrm_inspect_cmd(
    path: str = typer.Argument(..., help="An MRM or head PRM folder, or an embedded one by name: smol-mrm-head, "
                               "smol-mrm, head-prm (also head-prm:PATH, as --reward takes it)."),
    as_json: bool = AS_JSON,
) -> None:
    """What an MRM folder holds: kind, base model, shapes, vocabulary, masked tokens. Reads files only."""
    from saffron.mrm import EMBEDDED, check_mrm_spec
    from saffron.mrm.registry import inspect_mrm

    name, _, arg = path.partition(":")
    if name == "head-prm":  # the reward-model spec, as --reward takes it: the embedded head PRM or head-prm:PATH
        from saffron.guards.registry import check_guard_spec
        from saffron.mrm.prm import ASSET

        check_guard_spec(path)
        folder = Path(arg) if arg else ASSET
    else:
        check_mrm_spec(path)
        folder = EMBEDDED[path][0] if path in EMBEDDED else Path(path)
    emit(inspect_mrm(folder), as_json)
