"""Loading any MRM by name or folder: the embedded MRMs, a folder of any kind (its manifest's ``kind`` picks the
loader), and ``saffron mrm inspect``'s view of a folder.

Kinds: ``lora`` (``lora.py``; also a folder without a manifest, the authors' release), ``head`` (``head.py``);
a ``prm`` folder (``prm.py``) is refused as an MRM and named as a reward model instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saffron.errors import SaffronError
from saffron.mrm.base import Mrm, read_manifest
from saffron.mrm.head import inspect_head_mrm, load_head_mrm
from saffron.mrm.lora import inspect_lora_mrm, load_lora_mrm
from saffron.mrm.prm import inspect_head_prm

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


def load_mrm(path: str | Path, base_model: str | None = None, device: str | None = None) -> Mrm:
    """Load an MRM folder; ``base_model`` overrides where the base weights come from (e.g. a local copy)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None and manifest.kind == "head":
        return load_head_mrm(path, base_model, device)
    if manifest is not None and manifest.kind == "prm":
        raise SaffronError(f"{path} is a head PRM (a reward model for the baselines), not an MRM: pass it as "
                           f"--reward head-prm:{path}")
    return load_lora_mrm(path, manifest, base_model, device)


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


def inspect_mrm(path: str | Path) -> dict[str, Any]:
    """What an MRM folder (or a head PRM's) holds, read from its files alone (no base model needed)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None and manifest.kind == "head":
        return inspect_head_mrm(path, manifest)
    if manifest is not None and manifest.kind == "prm":
        return inspect_head_prm(path, manifest)
    return inspect_lora_mrm(path, manifest)
