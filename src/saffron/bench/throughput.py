"""``saffron bench throughput``: prompts/s and achieved model GFLOP/s with batching across prompts off and on.

Each method (``none``, Best-of-N with ``n`` samples, Saffron at each of ``widths``) searches the same ``limit``
prompts on the embedded stack at every K of ``ks``: K = 1 runs them one after another as ``saffron eval`` does;
K > 1 runs K at a time in lockstep (``batching.py``, ``--prompt-batch K``). Only the search is timed (no
judges). Per run:

- ``prompts_per_s``; ``gflops``: the sum of the prompts' own analytic FLOPs (what K = 1 would count) over the
  wall time, and ``fraction_of_peak`` against ``peak_gflops``, a matrix product in the model's dtype, of
  the model's MLP shape at the same thread count on the model's device, timed here before and after the runs
  (``peak_windows``: best and median of each window; the peak is the better best), each point after one
  untimed warm-up search; on an accelerator also ``square_peak_gflops`` (a 4096-cube product, the hardware's
  limit, where the model's small GEMM is launch-bound) and each run's ``fraction_of_square_peak``;
- ``identical_share``: the share of prompts whose output tokens and FLOPs equal the first K's (K = 1 when it is
  in ``ks``); any difference comes from float summation order (``batching.py``);
- ``merged``: the coordinator's counts (merged forwards, parts and query tokens per forward).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from saffron.batching import Coordinator, fork_stack, lockstep_map
from saffron.config import EvalConfig, build_method, check_prompt_batch, resolve, validate
from saffron.data import load_dataset
from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import InputError
from saffron.evaluate import build_stack
from saffron.flops import ArchSpec
from saffron.methods import MethodResult, Stack, get_method
from saffron.pipeline import prompt_seed, run_prompt
from saffron.session import Session, make_session

METHODS = ("none", "best-of-n", "saffron")
KS = (1, 4, 16)
WIDTHS = (44, 4)  # Saffron's matched width, and a small one
N_SAMPLES = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(d_in: int, d_out: int, dtype: torch.dtype, rows: int = 512, seconds: float = 1.0,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """GFLOP/s of ``[rows, d_in] @ [d_in, d_out]`` in ``dtype`` on ``device`` (at torch's current thread count
    on the CPU): the best and the median of the batches timed in ``seconds`` after a warm-up. On an accelerator
    each batch ends with a synchronisation, so the clock sees the kernels finish, not just their launch."""
    dev = torch.device(device)
    x, w = torch.randn(rows, d_in, dtype=dtype, device=dev), torch.randn(d_in, d_out, dtype=dtype, device=dev)
    for _ in range(3):
        x @ w
    _sync(dev)
    batch = 5 if dev.type == "cpu" else 50  # a GPU product of this size takes microseconds: amortise the sync
    flops, rates, t_end = 2 * rows * d_in * d_out, [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(batch):
            x @ w
        _sync(dev)
        rates.append(batch * flops / (time.perf_counter() - t0))
    return {"best_gflops": round(max(rates) / 1e9, 2), "median_gflops": round(statistics.median(rates) / 1e9, 2),
            "gemm": [rows, d_in, d_out], "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "device": str(dev)}


def run_points(methods: Sequence[str], widths: Sequence[int], n: int, max_new_tokens: int | None
               ) -> list[tuple[str, dict[str, Any]]]:
    """(method, options) for every run: Saffron once per width, Best-of-N with ``n`` samples."""
    points = []
    for m in methods:
        get_method(m)  # an unknown name is one line
        opts: dict[str, Any] = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        if m == "saffron":
            points += [(m, {**opts, "width": w}) for w in widths]
        elif m == "best-of-n":
            points.append((m, {**opts, "n": n}))
        else:
            points.append((m, opts))
    return points


def search_all(cfg: EvalConfig, stack: Stack, sessions: Sequence[tuple[str, Session]], k: int
               ) -> tuple[list[MethodResult], float, dict[str, Any] | None]:
    """Every session's search at prompt batch ``k``: results in session order, wall seconds, merged counts."""
    method = build_method(cfg)

    def one(st: Stack, i: int) -> tuple[int, MethodResult]:
        pid, session = sessions[i]
        return i, run_prompt(method, st, session, prompt_seed(cfg.seed, pid)).result

    t0 = time.perf_counter()
    if k == 1:
        got = dict(one(stack, i) for i in range(len(sessions)))
        return [got[i] for i in range(len(sessions))], time.perf_counter() - t0, None
    coord = Coordinator()
    workers = [fork_stack(stack, coord) for _ in range(min(k, len(sessions)))]
    got = dict(lockstep_map(one, range(len(sessions)), workers, coord))
    return [got[i] for i in range(len(sessions))], time.perf_counter() - t0, coord.stats.as_dict()


def _peaks(machine: dict[str, Any], gemm: tuple[int, int, torch.dtype], runs: list[dict[str, Any]]
           ) -> tuple[float, dict[str, dict[str, Any]], float | None]:
    """The peak after the runs too, and each run's fraction of it (the better window's best). A busy or throttled
    machine moves the peak, and a fraction of a peak taken in a quiet moment only would understate every run.
    On an accelerator the model's GEMM is small (launch-bound), so a large square product, the hardware's own
    limit, is reported beside it and each run gets its fraction of that too."""
    after = matmul_peak(*gemm, device=machine["device"])
    windows = {"before": machine, "after": after}
    peak = max(machine["best_gflops"], after["best_gflops"])
    square = None
    if machine["device"] != "cpu":
        square = matmul_peak(4096, 4096, gemm[2], rows=4096, device=machine["device"])["best_gflops"]
    for r in runs:
        r["fraction_of_peak"] = round(r["gflops"] / peak, 4)
        if square:
            r["fraction_of_square_peak"] = round(r["gflops"] / square, 5)
    return peak, windows, square


def bench_throughput(methods: Sequence[str] = METHODS, ks: Sequence[int] = KS, limit: int = 16,
                     widths: Sequence[int] = WIDTHS, n: int = N_SAMPLES, max_new_tokens: int | None = None,
                     dataset: str = "pyrit-harmful", policy: str = EMBEDDED_POLICY) -> dict[str, Any]:
    """See the module docstring. Usage: ``bench_throughput(["none"], ks=[1, 4], limit=4, max_new_tokens=8)``."""
    if not ks or not methods:
        raise InputError("bench throughput needs at least one method and one --k")
    for k in ks:
        check_prompt_batch(k, "--k")
    if limit <= 0:
        raise InputError(f"--limit must be a positive number of prompts, got {limit}")
    if any(w <= 0 for w in widths) or n <= 0:
        raise InputError("--widths and --n must be positive")
    points = run_points(methods, widths, n, max_new_tokens)
    runs: list[dict[str, Any]] = []
    machine: dict[str, Any] | None = None
    for name, opts in points:
        cfg = resolve(EvalConfig(method=name, method_options=opts, dataset=dataset, policy=policy))
        method = validate(cfg, limit)
        stack = build_stack(cfg)
        policy_model = stack.policy.model
        if machine is None:
            arch = ArchSpec.from_config(policy_model.hf.config)
            gemm = (arch.d_model, arch.d_ff, next(policy_model.hf.parameters()).dtype)
            machine = matmul_peak(*gemm, device=policy_model.device)
        sessions = [(ex.id, make_session(policy_model, ex, None, cfg.prefill_tokens,
                                         reserve=method.config.max_new_tokens))
                    for ex in load_dataset(cfg.dataset)[:limit]]
        ref: list[MethodResult] | None = None
        base_rate = None
        # one untimed search first: the first forwards of a shape pay for allocation and kernel choice, which
        # would otherwise be charged to whichever K runs first
        search_all(cfg, stack, sessions[:1], 1)
        for k in ks:
            results, wall, merged = search_all(cfg, stack, sessions, k)
            ref = ref or results
            flops = sum(sum(r.flops.values()) for r in results)
            same = sum(a.output_ids == b.output_ids and a.flops == b.flops for a, b in zip(results, ref, strict=True))
            rate = len(sessions) / wall
            base_rate = base_rate or rate
            gflops = flops / wall / 1e9
            runs.append({"method": name, "options": {k2: v for k2, v in opts.items() if k2 != "max_new_tokens"},
                         "k": k, "prompts": len(sessions), "seconds": round(wall, 3),
                         "prompts_per_s": round(rate, 4), "gflops": round(gflops, 2),
                         "speedup_vs_first_k": round(rate / base_rate, 3), "tflops_per_prompt": flops / len(
                             sessions) / 1e12, "identical_share": same / len(sessions), "merged": merged})
    assert machine is not None
    peak, windows, square = _peaks(machine, gemm, runs)
    return {"peak_gflops": peak, "peak_windows": {w: {"best_gflops": m["best_gflops"],
                                                     "median_gflops": m["median_gflops"]}
                                                 for w, m in windows.items()},
            **{k: machine[k] for k in ("gemm", "dtype", "threads", "device")}, "square_peak_gflops": square,
            "policy": policy, "dataset": dataset, "prompts": limit, "ks": list(ks),
            "max_new_tokens": max_new_tokens, "runs": runs}


def format_throughput(res: dict[str, Any]) -> str:
    """A Markdown table of ``bench_throughput``'s runs."""
    win = res["peak_windows"]
    lines = [f"matmul peak: {res['peak_gflops']} GFLOP/s ({res['dtype']}, {res['threads']} threads, GEMM "
             f"{'x'.join(map(str, res['gemm']))}; best / median before the runs {win['before']['best_gflops']} / "
             f"{win['before']['median_gflops']}, after {win['after']['best_gflops']} / "
             f"{win['after']['median_gflops']}; {res.get('device', 'cpu')})"
             + (f"; square 4096 GEMM: {res['square_peak_gflops']} GFLOP/s" if res.get("square_peak_gflops") else ""),
             "",
             "| method | options | K | prompts/s | GFLOP/s | of peak | speed-up | identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(f"| {r['method']} | {opts} | {r['k']} | {r['prompts_per_s']:.3f} | {r['gflops']:.1f} | "
                     f"{100 * r['fraction_of_peak']:.1f} % | {r['speedup_vs_first_k']:.2f}x | "
                     f"{100 * r['identical_share']:.0f} % |")
    return "\n".join(lines)
