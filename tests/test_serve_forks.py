"""The server's workers run forks of models built once, as the harness's ``--prompt-batch`` workers do.

On the tiny random models: at ``--max-batch 8`` every model is built once and a guard's fixed instructions are
computed in one forward, not one per worker; each worker's fork holds them (copied), has a cache of its own and
sends its forwards where its worker's do; and the answers, FLOPs and verdicts are those of un-forked models built
for the request alone, one request at a time or several side by side.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi", reason="saffron serve's extra is not installed: pip install 'saffron[serve]'")

import saffron.runner
from saffron.methods import METHODS, Stack
from saffron.model import Model
from saffron.pipeline import prompt_seed, run_prompt
from saffron.runner import ForwardPart, Runner
from saffron.serve import Engine
from saffron.serve.engine import SEED_KEY, Outcome, Plan
from saffron.serve.schemas import ChatCompletionRequest
from tests.test_serve import Counted, engine, tiny_guard, tiny_mrm
from tests.test_serve_batching import PROMPTS, Together

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Forwards:
    """Every forward run directly (``runner.run_parts``, what a runner without a batcher calls): its tokens."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._run = saffron.runner.run_parts

    def __call__(self, parts: Sequence[ForwardPart]) -> None:
        self.tokens.append(sum(p.n for p in parts))
        self._run(parts)


def test_at_max_batch_8_each_guards_instructions_are_computed_once_and_every_worker_holds_them(
        tiny: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    forwards = Forwards()
    monkeypatch.setattr(saffron.runner, "run_parts", forwards)
    eng = engine(tiny, judge=True, max_batch=8)
    at_start = list(forwards.tokens)
    alone = tiny_guard(tiny)  # one more forward: its own instructions
    prefix = alone.fixed_prefix()
    # building the server ran two forwards: the reward guard's instructions and the judge guard's (8 each before)
    assert at_start == [len(prefix), len(prefix)] and len(prefix) > 0
    made = [eng.models._make[r] for r in ("reward", "mrm")]
    assert [m.calls if isinstance(m, Counted) else None for m in made] == [1, 1]  # each model built once
    assert eng.setup_flops() == {"reward": alone.setup_flops, "mrm": 0, "judge": alone.setup_flops}

    built = eng.models.built("reward").runner
    slots = list(range(len(prefix)))
    runners = []
    for w in eng.workers:
        guard, judge = w.held["reward"], w.held["judge"].judges["tiny-guard"]
        for r, sink in ((guard.runner, w.sink), (judge.runner, None), (w.held["mrm"].runner, w.sink),
                        (w.policy, w.sink)):
            assert r.model is tiny and r.batcher is sink  # same weights; the judge's forwards run directly
            runners.append(r)
        # the fork holds the kept instructions, bit for bit, without having computed them
        assert guard.runner.trie.cached_length(prefix) == len(prefix) and guard.runner.stats.forwards == 0
        for mine, theirs in zip(guard.runner.pool.k + guard.runner.pool.v, built.pool.k + built.pool.v, strict=True):
            assert torch.equal(mine[:, slots], theirs[:, slots])
    # and a cache of its own: no two runners (nor a worker's and the built one) share a trie or a pool
    assert len({id(r.trie) for r in [*runners, built]}) == len({id(r.pool) for r in [*runners, built]}) \
        == len(runners) + 1
    assert forwards.tokens == [len(prefix)] * 3  # looking at the forks computed nothing
    eng.close()


def ask(eng: Engine, prompt: str, method: str) -> Plan:
    return eng.prepare(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "seed": 3,
         "saffron": {"method": method, "width": 3, "judge": True}}))


def unforked(tiny: Model, plan: Plan) -> tuple[Any, ...]:
    """What ``plan`` gives on models built for it alone (no fork anywhere), as the server reports it."""
    stack = Stack(policy=Runner(tiny), reward=tiny_guard(tiny), mrm=tiny_mrm(tiny))
    run = run_prompt(plan.method, stack, plan.session, prompt_seed(plan.seed, SEED_KEY),
                     judges={"tiny-guard": tiny_guard(tiny)})
    flops = {**{k: int(v) for k, v in run.result.flops.items()}, "judge": sum(run.judge_flops.values())}
    return tuple(run.result.output_ids), flops, {n: float(v["reward"]) for n, v in run.verdicts.items()}


def served(out: Outcome) -> tuple[Any, ...]:
    return out.output_ids, {k: v for k, v in out.flops.items() if k != "total"}, \
        {n: v["reward"] for n, v in out.verdicts.items()}


@pytest.mark.parametrize("batch", [1, 4])
def test_forked_workers_answer_as_models_built_for_the_request_alone(
        tiny: Model, monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    monkeypatch.setitem(METHODS, Together.name, Together)
    eng = engine(tiny, judge=True, max_batch=batch)
    want = [unforked(tiny, ask(eng, p, "saffron")) for p in PROMPTS]
    monkeypatch.setattr(Together, "barrier", threading.Barrier(batch))  # side by side: merged from the start
    with ThreadPoolExecutor(batch) as pool:
        got = list(pool.map(lambda p: served(eng.run(ask(eng, p, "together"))), PROMPTS))
    eng.close()
    assert got == want
    assert len({g[0] for g in got}) == len(PROMPTS) and all(g[1]["reward"] > 0 for g in got)  # real searches
