"""The one factory of evaluation backends (``--backend``): this process or Ray actors.

Kept out of ``evaluate.py`` because the Ray backend imports the harness it distributes; ``distributed.py`` itself
imports Ray only when a backend starts, so importing this module stays cheap.
"""

from __future__ import annotations

from saffron.config import check_prompt_batch
from saffron.distributed import RayBackend
from saffron.errors import InputError, SaffronError
from saffron.evaluate import Backend, LocalBackend

BACKENDS = ("local", "ray")


def make_backend(kind: str = "local", ray_address: str | None = None, ray_workers: int | None = None,
                 ray_gpus_per_worker: float | None = None, prompt_batch: int = 1) -> Backend:
    """The backend the CLI's ``--backend`` names. Checks its options and that Ray is importable, so a mistake is
    reported before any model loads; starts nothing (Ray starts when the first prompt needs it).
    ``prompt_batch``: prompts run in lockstep by the local backend (``LocalBackend``)."""
    check_prompt_batch(prompt_batch)
    if kind == "local":
        given = [f for f, v in (("--ray-address", ray_address), ("--ray-workers", ray_workers),
                                ("--ray-gpus-per-worker", ray_gpus_per_worker)) if v is not None]
        if given:
            raise SaffronError(f"{given[0]} needs --backend ray")
        return LocalBackend(prompt_batch)
    if kind == "ray":
        if prompt_batch > 1:
            raise InputError("--prompt-batch needs --backend local (each Ray actor runs one prompt at a time)")
        return RayBackend(address=ray_address, workers=ray_workers, gpus_per_worker=ray_gpus_per_worker)
    raise SaffronError(f"unknown backend '{kind}'; known: {', '.join(BACKENDS)}")
