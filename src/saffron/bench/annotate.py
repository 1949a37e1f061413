"""``saffron bench annotate``: how fast ``build-rewards`` annotates, with the runner's prefix cache and without."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.guards.base import RewardModel
from saffron.model import load_model
from saffron.mrm.data.annotate import DEFAULT_CHUNK, DEFAULT_REWARD, Annotator, load_reward
from saffron.mrm.data.build import DEFAULT_MAX_TOKENS
from saffron.mrm.data.corpus import plan_corpus
from saffron.runner import Runner


def annotation_throughput(reward: str | RewardModel = DEFAULT_REWARD, policy: str = EMBEDDED_POLICY,
                          corpus: str = "pyrit-harmful:train", rows: int = 4, max_tokens: int = DEFAULT_MAX_TOKENS,
                          chunk: int = DEFAULT_CHUNK) -> dict[str, Any]:
    """Annotation speed (response tokens scored per second) with the runner's prefix cache and without it
    (``Runner(cache=False)``: every prefix recomputed in full), on the first ``rows`` text rows of ``corpus``.

    Usage: ``annotation_throughput("smol-guard", rows=4)``. Both passes score the same prefixes; the largest
    difference between their rewards is reported (it should be float noise)."""
    pol = load_model(policy)
    rm, spec = load_reward(reward)
    pending, _ = plan_corpus(corpus, pol)
    sample = [(p.id, p.prompt, pol.encode(p.response)[:max_tokens]) for p in pending
              if p.response is not None][:rows]
    sample = [s for s in sample if s[2]]
    if not sample:
        raise SaffronError(f"corpus '{corpus}' has no text rows to time (policy: sources are not timed)")
    original = rm.runner
    res: dict[str, Any] = {"reward_model": spec, "policy": policy, "rows": len(sample),
                           "tokens": sum(len(s[2]) for s in sample), "max_tokens": max_tokens, "chunk": chunk}
    rewards: dict[str, list[float]] = {}
    try:
        for name, make in (("cached", _fresh_runner(original, True)), ("uncached", _fresh_runner(original, False))):
            rm.runner = make()
            ann = Annotator(rm, pol, chunk, cache_reset_tokens=1 << 62)
            t0 = time.perf_counter()
            got = [x for rid, prompt, ids in sample for x in ann.rewards(rid, prompt, ids)]
            dt = time.perf_counter() - t0
            rewards[name] = got
            res[f"{name}_seconds"] = round(dt, 3)
            res[f"{name}_tokens_per_second"] = round(res["tokens"] / dt, 2)
            res[f"{name}_computed_tokens"] = rm.runner.stats.computed_tokens
            res[f"{name}_flops"] = rm.runner.flops
    finally:
        rm.runner = original
    res["speedup"] = round(res["cached_tokens_per_second"] / res["uncached_tokens_per_second"], 2)
    res["max_abs_diff"] = max(abs(a - b) for a, b in zip(rewards["cached"], rewards["uncached"], strict=True))
    return res


def _fresh_runner(template: Runner, cache: bool) -> Callable[[], Runner]:
    def make() -> Runner:
        return Runner(template.model, head=template.head, cache=cache,
                      depth=template.depth if template.truncated else None)

    return make
