"""Rejection sampling: draw one continuation at a time until the reward model calls it safe (reward > 0).

Cheaper than Best-of-N when the policy is often safe already: it stops at the first safe sample. After ``n``
unsafe tries it returns the best one seen (first on ties). Same sampling defaults as Best-of-N.

Options (defaults): ``n`` (32, the most tries: the budget), ``max_new_tokens`` (32), ``min_new_tokens`` (the
shared 16), ``temperature`` (0.7), ``top_p`` (0.9). Tuning grid: ``grids.TUNING_GRIDS["rejection"]``.
"""

from __future__ import annotations

from typing import Any

import torch

from saffron.methods.base import FlopMeter, Method, MethodResult, Stack, check_int, check_lengths, require_reward
from saffron.methods.sampling import check_sampling
from saffron.methods.tree import Limits, argmax_first, extend
from saffron.session import Session


class Rejection(Method):
    name = "rejection"
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
        seen: list[tuple[int, ...]] = []
        rewards: list[float] = []
        for _ in range(self.n):
            sample = extend(runner, session.context_ids, [()], self.max_new_tokens, limits, self.temperature,
                            self.top_p, gen)[0]
            seen.append(sample.tokens)
            rewards.append(reward.score_outputs(session, runner.model, [sample.tokens])[0])
            if rewards[-1] > 0:
                break
        best = len(rewards) - 1 if rewards[-1] > 0 else argmax_first(rewards)
        return MethodResult(seen[best], meter.delta(),
                            {"n_reward_calls": len(rewards), "rewards": rewards, "chosen": best,
                             "accepted": rewards[-1] > 0})
