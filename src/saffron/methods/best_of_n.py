"""Best-of-N: sample N full continuations, score each once with the reward model, keep the best.

The baseline the paper finds hardest to beat: one reward call per sample, no search. The N samples run in
lockstep as one batch per step (they share the prompt's cached prefix), and all N are scored in one call.
Defaults: temperature 0.7 with top-p 0.9 (diverse but not degenerate samples; the paper does not say).

Options (defaults): ``n`` (32, the budget), ``max_new_tokens`` (32), ``min_new_tokens`` (the shared 16),
``temperature`` (0.7), ``top_p`` (0.9). Tuning grid: ``grids.TUNING_GRIDS["best-of-n"]``.
"""

from __future__ import annotations

from typing import Any

import torch

from saffron.methods.base import FlopMeter, Method, MethodResult, Stack, check_int, check_lengths, require_reward
from saffron.methods.sampling import check_sampling
from saffron.methods.tree import Limits, argmax_first, extend
from saffron.session import Session


class BestOfN(Method):
    name = "best-of-n"
    budget = "n"
    uses = ("reward",)

    def __init__(self, n: int = 32, max_new_tokens: int = 32, min_new_tokens: int | None = None,
                 temperature: float = 0.7, top_p: float = 0.9) -> None:
        check_int("n", n)
        min_new_tokens = check_lengths(max_new_tokens, min_new_tokens)
        check_sampling(temperature, top_p)
        self.n, self.max_new_tokens, self.min_new_tokens = n, max_new_tokens, min_new_tokens
        self.temperature, self.top_p = temperature, top_p

    def options(self) -> dict[str, Any]:
        return {"n": self.n, "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p}

    def run(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        reward = require_reward(stack, self.name)
        runner = stack.policy
        meter = FlopMeter(policy=runner, reward=reward)
        gen = torch.Generator().manual_seed(seed)
        limits = Limits(runner.model.eos_ids, self.min_new_tokens, self.max_new_tokens)
        samples = extend(runner, session.context_ids, [()] * self.n, self.max_new_tokens, limits,
                         self.temperature, self.top_p, gen)
        rewards = reward.score_outputs(session, runner.model, [s.tokens for s in samples])
        best = argmax_first(rewards)
        return MethodResult(samples[best].tokens, meter.delta(),
                            {"n_reward_calls": 1, "rewards": rewards, "chosen": best})
