"""The multifurcation reward model (MRM): one forward pass predicts the safety reward of every next token."""

from __future__ import annotations

from pathlib import Path

from saffron.errors import SaffronError
from saffron.mrm.model import Mrm, load_mrm

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The embedded MRMs (docs/benchmarks.md has their figures), both trained on 512 rows of the train split, 48 tokens
# each. smol-mrm-head, the default, reads the policy's hidden states (head.py); smol-mrm is the paper's form.
EMBEDDED = {
    "smol-mrm-head": (ASSETS / "smol_mrm_head", "saffron build-rewards --out runs/rewards --max-tokens 48 --limit "
                      "128 --seed 0 && saffron train-mrm --kind head --data runs/rewards --out {path} --seed 0"),
    "smol-mrm": (ASSETS / "smol_mrm", "saffron build-rewards --out runs/rewards --max-tokens 48 --limit 128 --seed 0 "
                 "&& saffron train-mrm --data runs/rewards --out {path} --eos mask --lr 2e-3 --epochs 4 --seed 0"),
}
EMBEDDED_MRM = "smol-mrm-head"


def load_mrm_spec(spec: str = EMBEDDED_MRM, device: str | None = None) -> Mrm:
    """An embedded MRM (``smol-mrm-head``, ``smol-mrm``) or an MRM folder."""
    check_mrm_spec(spec)
    if spec in EMBEDDED:
        path, hint = EMBEDDED[spec]
        if not (path / "saffron.json").is_file():
            raise SaffronError(f"the embedded MRM {spec} is missing from {path}; build it with "
                               f"`{hint.format(path=path)}`")
        return load_mrm(path, device=device)
    return load_mrm(Path(spec), device=device)


def check_mrm_spec(spec: str) -> None:
    if spec not in EMBEDDED and not Path(spec).is_dir():
        raise SaffronError(f"MRM '{spec}' is neither an embedded MRM ({', '.join(EMBEDDED)}) nor a folder")


__all__ = ["EMBEDDED", "EMBEDDED_MRM", "Mrm", "check_mrm_spec", "load_mrm", "load_mrm_spec"]
