"""``saffron bench flops``: the runner's analytic FLOPs against torch's FlopCounterMode on the same calls.

FlopCounterMode counts the matrix multiplications (linear layers, attention, the vocabulary head) that torch
dispatches; elementwise work is ignored by both. It has no formula for the CPU attention kernel that SDPA runs
here (``aten._scaled_dot_product_flash_attention_for_cpu``; only the CUDA kernels have one), so attention would
go uncounted: we register the formula torch uses for the CUDA kernels (two matmuls, 4*B*H*Sq*Sk*D, grouped-query
attention counted per query head). The workload mixes a long prefill, a batch of branches over a shared cached
prefix, and single-token steps, so every term of the formula is exercised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from saffron.embedded import EMBEDDED_POLICY
from saffron.model import Model, load_model
from saffron.runner import Runner


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
def _sdpa_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, out_val: Any = None,
                **kwargs: Any) -> int:
    b, h, sq, d = query.shape
    sk, dv = key.shape[-2], value.shape[-1]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def flops_workload(model: Model, prompt_tokens: int = 200, branches: int = 8, steps: int = 4) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, model.vocab_size, (prompt_tokens,), generator=g).tolist()
    calls = [[prompt]]
    seqs = [prompt + [int(t)] for t in torch.randint(100, model.vocab_size, (branches,), generator=g)]
    for _ in range(steps):
        calls.append(seqs)
        seqs = [s + [int(torch.randint(100, model.vocab_size, (1,), generator=g))] for s in seqs]
    return calls


def bench_flops(model_spec: str = EMBEDDED_POLICY) -> dict[str, Any]:
    model = load_model(model_spec)
    calls = flops_workload(model)
    per_call = []
    runner = Runner(model)
    total_analytic = total_measured = 0
    for seqs in calls:
        before = runner.flops
        with FlopCounterMode(display=False) as fc:
            runner.forward(seqs)
        analytic = runner.flops - before
        measured = fc.get_total_flops()
        per_call.append({"sequences": len(seqs), "analytic": analytic, "measured": measured})
        total_analytic += analytic
        total_measured += measured
    return {
        "model": model_spec,
        "calls": per_call,
        "analytic_flops": total_analytic,
        "measured_flops": total_measured,
        "rel_err": abs(total_analytic - total_measured) / total_measured,
        "max_call_rel_err": max(abs(c["analytic"] - c["measured"]) / c["measured"] for c in per_call),
    }
