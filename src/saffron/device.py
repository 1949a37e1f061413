"""Where models run, in what precision, and by which runner: the one place ``--device``, ``--dtype`` and
``--runner`` are checked and resolved.

A ``Placement`` holds the three choices as the user wrote them (``auto`` by default). The CLI sets the process
default once (``set_default``) before any model loads; a configuration that travels to another process (a Ray
actor's ``EvalConfig``) re-applies its own with ``placed``. ``load_model`` and ``Runner`` read the current
placement, so every model of a run (policy, reward model, MRM, judges) lands on the same device in the same
dtype without each loader taking the options.

``auto`` keeps the behaviour from before these flags: the ``SAFFRON_DEVICE`` variable, else CUDA when present,
else the CPU; fp32 on the CPU and bf16 elsewhere; the cached tree runner where the architecture has one, else
full recompute with one note on stderr.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from saffron.errors import IncompatibleError, InputError, UnavailableError

DTYPES = ("auto", "fp32", "bf16", "fp16")
RUNNERS = ("auto", "cached", "uncached")
DEVICE_HELP = "auto|cpu|cuda|cuda:N|mps"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Placement:
    """Device, dtype and runner as the user named them; ``check`` validates the names without touching torch."""

    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"  # auto|fp32|bf16|fp16 (auto: fp32 on the CPU, bf16 elsewhere)
    runner: str = "auto"  # auto|cached|uncached (auto: cached where the architecture has a tree runner)

    def check(self) -> Placement:
        """One line naming the first bad value; returns ``self`` so a caller can check and pass it on."""
        check_device_name(self.device, "--device")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.runner not in RUNNERS:
            raise InputError(f"--runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        return self

    @property
    def is_default(self) -> bool:
        return self == Placement()


def check_device_name(spec: str, source: str) -> None:
    if not _DEVICE_RE.match(spec):
        raise InputError(f"{source} must be {DEVICE_HELP}, got {spec!r}")


_current = Placement()


def current() -> Placement:
    return _current


def set_default(p: Placement) -> None:
    """Make ``p`` the process's placement (the CLI, once, before any model loads)."""
    global _current
    _current = p.check()


@contextmanager
def placed(p: Placement) -> Iterator[None]:
    """Load and run under ``p`` inside the block, then restore the previous placement. A default ``p`` leaves
    the process's placement alone, so a library caller's ``EvalConfig()`` does not undo the CLI's flags."""
    global _current
    if p.is_default:
        yield
        return
    before = _current
    _current = p.check()
    try:
        yield
    finally:
        _current = before


def resolve_device(spec: str | None = None) -> str:
    """A torch device string for ``spec`` (None: the current placement's). Refuses a device this machine lacks."""
    import torch

    spec = spec or _current.device
    check_device_name(spec, "--device")
    if spec == "auto":
        env = os.environ.get("SAFFRON_DEVICE") or "auto"
        check_device_name(env, "SAFFRON_DEVICE")
        spec = env if env != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnavailableError(f"device {spec}: no CUDA device is available here (torch {torch.__version__}); "
                               "use --device cpu or auto")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UnavailableError(f"device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif spec == "mps" and not torch.backends.mps.is_available():
        raise UnavailableError("device mps: the Metal backend is not available here; use --device cpu or auto")
    return spec


def resolve_dtype(spec: str | None, device: str) -> Any:
    """The torch dtype for ``spec`` on ``device`` (None: the current placement's). ``auto`` is fp32 on the CPU
    and bf16 elsewhere; fp16 on the CPU, and a half precision the device cannot compute in, are refused in one
    line."""
    import torch

    spec = spec or _current.dtype
    if spec not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {spec!r}")
    if spec == "auto":
        spec = "fp32" if device == "cpu" else "bf16"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]
    if spec == "fp16" and device == "cpu":  # some torch builds compute it, but about 10x slower than fp32 here
        raise UnavailableError("--dtype fp16 is refused on the CPU (its kernels there are slow or missing); use "
                               "--dtype fp32, or bf16")
    if dtype != torch.float32 and not supports(device, spec):
        raise UnavailableError(f"--dtype {spec} is not supported on {device} by this torch ({torch.__version__}); "
                           "use --dtype fp32")
    return dtype


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``bf16`` (the flag's spelling)."""
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), str(dtype))


@functools.lru_cache(maxsize=16)
def supports(device: str, dtype: str) -> bool:
    """Whether ``device`` runs what a decoder needs in ``dtype``: a matmul, a softmax and attention. Probed once
    with tiny tensors: torch builds differ (older CPU builds lack half-precision matmul)."""
    import torch
    import torch.nn.functional as F

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        x = torch.ones((2, 4, 8), dtype=dt, device=device)
        y = (x @ x.transpose(1, 2)).softmax(-1)
        F.scaled_dot_product_attention(x[None], x[None], x[None])
        return bool(torch.isfinite(y.float()).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def runner_allows_uncached(architecture: str, supported: tuple[str, ...]) -> bool:
    """Whether a runner may fall back to full recompute for ``architecture`` (no tree runner for it), under the
    current placement: ``auto`` may, with one note on stderr per architecture; ``cached`` refuses."""
    if _current.runner == "cached":
        return False
    if architecture not in _noted:
        _noted.add(architecture)
        print(f"saffron: architecture '{architecture}' has no cached tree runner (it has: {', '.join(supported)}); "
              "running it uncached, by full recompute (slower); --runner cached refuses instead", file=sys.stderr)
    return True


_noted: set[str] = set()


def runner_forced_uncached() -> bool:
    """``--runner uncached``: every runner recomputes in full, supported architecture or not."""
    return _current.runner == "uncached"


def check_same_device(models: dict[str, Any]) -> None:
    """Refuse models that must exchange tensors but sit on different devices (role -> ``Model``): a clear line
    now instead of a device-mismatch traceback deep inside a search."""
    where = {role: str(m.device) for role, m in models.items() if m is not None}
    if len(set(where.values())) > 1:
        listed = ", ".join(f"{role} on {d}" for role, d in where.items())
        raise IncompatibleError(f"the models of one search must share a device, got {listed}; load them with one "
                           "--device")
