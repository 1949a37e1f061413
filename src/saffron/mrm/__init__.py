"""The multifurcation reward model (MRM): one forward pass predicts the safety reward of every next token."""

from __future__ import annotations

from pathlib import Path

from saffron.errors import SaffronError
from saffron.mrm.model import Mrm, load_mrm

EMBEDDED_MRM = "smol-mrm"
ASSET = Path(__file__).resolve().parent.parent / "assets" / "smol_mrm"
# How the shipped MRM was made (docs/benchmarks.md has the figures): 512 rows of the train split, 48 tokens each.
BUILD_HINT = ("saffron build-rewards --out runs/rewards --max-tokens 48 --limit 128 --seed 0 && saffron train-mrm "
              f"--data runs/rewards --out {ASSET} --lr 2e-3 --epochs 3 --seed 0")


def load_mrm_spec(spec: str = EMBEDDED_MRM, device: str | None = None) -> Mrm:
    """``smol-mrm`` (the embedded MRM shipped with saffron) or an MRM folder."""
    if spec == EMBEDDED_MRM:
        if not (ASSET / "adapter_config.json").is_file():
            raise SaffronError(f"the embedded MRM is missing from {ASSET}; build it with `{BUILD_HINT}`")
        return load_mrm(ASSET, device=device)
    path = Path(spec)
    if not path.is_dir():
        raise SaffronError(f"MRM '{spec}' is neither '{EMBEDDED_MRM}' nor a folder")
    return load_mrm(path, device=device)


def check_mrm_spec(spec: str) -> None:
    if spec != EMBEDDED_MRM and not Path(spec).is_dir():
        raise SaffronError(f"MRM '{spec}' is neither '{EMBEDDED_MRM}' nor a folder")


__all__ = ["EMBEDDED_MRM", "Mrm", "check_mrm_spec", "load_mrm", "load_mrm_spec"]
