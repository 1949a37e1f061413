"""``saffron bench ray``: the same evaluation on the local backend and on local Ray; identical files, and what
Ray costs.

Both runs start cold in fresh folders: the local one loads its models in this process, the Ray one starts an
instance (unless one is running), its actors, and one model set per actor. ``overhead_s`` is Ray's wall time
minus the local one. On a machine with as many cores as workers, the workers share those cores with each other
(each actor runs torch on one thread, the local process on all of them), so there Ray can only cost time; the
figure says how much. Speed-ups need more cores or GPUs than one process can use.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from saffron.config import EvalConfig
from saffron.distributed import RayBackend
from saffron.embedded import EMBEDDED_POLICY
from saffron.evaluate import CONFIG_FILE, METRICS_FILE, RECORDS_FILE, LocalBackend, run_eval


def bench_ray(workers: int = 2, prompts: int = 6, n: int = 4, max_new_tokens: int = 32,
              policy: str = EMBEDDED_POLICY, judge: str = "smol-guard", reward: str | None = None,
              dataset: str = "pyrit-harmful", backend: RayBackend | None = None, local_threads: int | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Best-of-``n`` on the first ``prompts`` held-out prompts, locally then on Ray with ``workers`` actors.

    ``backend``: actors already running (tests), used and left running; ``ray_startup_s`` then counts nothing.
    ``local_threads``: torch threads for the local run (default torch's: one per core). On cores other jobs also
    use, torch's threads wait on each other; one thread shows the local run without that penalty."""
    import torch

    cfg = EvalConfig(method="best-of-n", dataset=dataset, policy=policy, judges=(judge,), reward=reward,
                     method_options={"n": n, "max_new_tokens": max_new_tokens})
    with tempfile.TemporaryDirectory(prefix="saffron-bench-ray-") as tmp:
        local, ray_out = Path(tmp) / "local", Path(tmp) / "ray"
        threads = torch.get_num_threads()
        used = local_threads or threads
        torch.set_num_threads(used)
        t0 = time.perf_counter()
        try:
            metrics = run_eval(cfg, local, prompts, progress=progress, backend=LocalBackend())
        finally:
            torch.set_num_threads(threads)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        be = backend or RayBackend(workers=workers)
        try:
            be.start()
            be.stats()  # returns once every actor process is up
            startup_s = time.perf_counter() - t0
            run_eval(cfg, ray_out, prompts, progress=progress, backend=be)
            stats = be.stats()
        finally:
            if backend is None:
                be.close()
        ray_s = time.perf_counter() - t0
        identical = all((local / f).read_bytes() == (ray_out / f).read_bytes()
                        for f in (CONFIG_FILE, RECORDS_FILE, METRICS_FILE))
    return {
        "identical": identical,
        "local_s": round(local_s, 2),
        "ray_s": round(ray_s, 2),
        "ray_startup_s": round(startup_s, 2),
        "overhead_s": round(ray_s - local_s, 2),
        "overhead_fraction": round((ray_s - local_s) / local_s, 3),
        "workers": len(stats),
        "prompts": metrics["n"],
        "method": f"best-of-n n={n}",
        "max_new_tokens": max_new_tokens,
        "asr": metrics["asr"],
        "tflops_per_prompt": metrics["tflops_per_prompt"],
        "cpu_count": os.cpu_count(),
        "local_torch_threads": used,
        "worker_torch_threads": [s["torch_threads"] for s in stats],
        "model_loads_per_worker": [s["loads"] for s in stats],
    }
