"""``saffron bench cache``: the runner's radix-tree KV cache on a Saffron-shaped search, against two baselines.

The workload is a real search trace: a ~``prompt_tokens``-token prompt, then ``steps`` steps in which every
active sequence's top-p children (by the embedded policy's own distribution) compete and the ``width`` with the
highest cumulative log-probability survive. The same trace is then replayed three ways:

- ``runner``: our runner; each step's batch is one tree-masked forward over the shared KV pool;
- ``nocache``: full recompute of every sequence at every step (equal-length rows batched);
- ``copies``: HF beam-search style, each beam its own row of a DynamicCache, reordered by parent every step.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from saffron.data import pyrit_harmful
from saffron.embedded import EMBEDDED_POLICY
from saffron.methods.sampling import nucleus_mask
from saffron.model import Model, load_model
from saffron.runner import Runner


def make_prompt(model: Model, n_tokens: int) -> list[int]:
    """A chat prompt of exactly ``n_tokens`` tokens built from held-out harmful prompts."""
    text, ids = "", []
    for ex in pyrit_harmful("all"):
        text += ex.prompt + " "
        ids = model.chat_prompt_ids(text)
        if len(ids) >= n_tokens:
            break
    head = model.chat_prompt_ids("x")
    suffix = head[head.index(model.encode("x")[0]) + 1:]  # the template after the user text
    body = ids[: n_tokens - len(suffix)]
    return body + suffix


def search_trace(model: Model, prompt: list[int], width: int, steps: int, top_p: float) -> list[list[list[int]]]:
    """Per step, the list of sequences the search asks the policy about (EOS banned so all run to the end)."""
    runner = Runner(model)
    beam: list[tuple[float, list[int]]] = [(0.0, prompt)]
    trace = []
    for _ in range(steps):
        seqs = [s for _, s in beam]
        trace.append(seqs)
        logits = runner.forward(seqs).logits
        assert logits is not None
        for e in model.eos_ids:
            logits[:, e] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        keep = nucleus_mask(logits, top_p)
        cands = []
        for b, (score, seq) in enumerate(beam):
            for tok in keep[b].nonzero().flatten().tolist():
                cands.append((score + float(logp[b, tok]), seq + [tok]))
        cands.sort(key=lambda c: -c[0])
        beam = cands[:width]
    return trace


def _time_runner(model: Model, trace: list[list[list[int]]], cache: bool) -> tuple[float, Runner]:
    runner = Runner(model, cache=cache)
    t0 = time.perf_counter()
    for seqs in trace:
        runner.forward(seqs)
    return time.perf_counter() - t0, runner


@torch.inference_mode()
def _time_copies(model: Model, trace: list[list[list[int]]]) -> tuple[float, int]:
    """Beam-search style: one cache row per beam, ``reorder_cache``-like index_select of the parents each step."""
    from transformers import DynamicCache
    from transformers.cache_utils import CacheLayerMixin

    hf, dev = model.hf, model.device
    t0 = time.perf_counter()
    cache = DynamicCache(config=hf.config)
    prompt = trace[0][0]
    hf(input_ids=torch.tensor([prompt[:-1]], device=dev), past_key_values=cache, use_cache=True)
    prev = [prompt[:-1]]
    peak = 0
    for seqs in trace:
        parents = [next(i for i, p in enumerate(prev) if s[: len(p)] == p) for s in seqs]
        cache.batch_select_indices(torch.tensor(parents, device=dev))
        n = len(seqs[0])
        hf(input_ids=torch.tensor([[s[-1]] for s in seqs], device=dev),
           position_ids=torch.full((len(seqs), 1), n - 1, device=dev), past_key_values=cache, use_cache=True)
        held = 0
        for layer in cache.layers:
            # The prefill above filled every layer; this baseline assumes attention layers, holding keys and values.
            assert isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None
            held += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        peak = max(peak, held)
        prev = seqs
    return time.perf_counter() - t0, peak


def bench_cache(prompt_tokens: int = 200, width: int = 16, steps: int = 32, top_p: float = 0.8,
                nocache: bool = True, repeats: int = 1, model_spec: str = EMBEDDED_POLICY) -> dict[str, Any]:
    model = load_model(model_spec)
    prompt = make_prompt(model, prompt_tokens)
    trace = search_trace(model, prompt, width, steps, top_p)
    unique = len({tuple(s[:i]) for seqs in trace for s in seqs for i in range(1, len(s) + 1)})
    t_run, runner = min((_time_runner(model, trace, True) for _ in range(repeats)), key=lambda x: x[0])
    t_copies, copies_bytes = min((_time_copies(model, trace) for _ in range(repeats)), key=lambda x: x[0])
    res: dict[str, Any] = {
        "prompt_tokens": len(prompt),
        "width": width,
        "steps": steps,
        "top_p": top_p,
        "sequences_scored": sum(len(s) for s in trace),
        "computed_tokens": runner.stats.computed_tokens,
        "unique_tokens": unique,
        "runner_seconds": round(t_run, 3),
        "copies_seconds": round(t_copies, 3),
        "speedup_vs_copies": round(t_copies / t_run, 3),
        "kv_bytes": runner.kv_bytes,
        "kv_bytes_unique": unique * runner.pool.bytes_per_token,
        "kv_bytes_copies_peak": copies_bytes,
        "overhead_fraction": round(1 - runner.stats.forward_seconds / runner.stats.total_seconds, 4),
        "runner_tflops": runner.flops / 1e12,
    }
    if nocache:
        t_no, no = _time_runner(model, trace, False)
        res.update({"nocache_seconds": round(t_no, 3), "speedup_vs_nocache": round(t_no / t_run, 3),
                    "nocache_computed_tokens": no.stats.computed_tokens, "nocache_tflops": no.flops / 1e12})
    else:
        res.update({"nocache_seconds": None, "speedup_vs_nocache": None})
    return res
