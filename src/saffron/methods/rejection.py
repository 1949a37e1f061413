"""Rejection sampling: draw one continuation at a time until the reward model calls it safe (reward > 0).

Cheaper than Best-of-N when the policy is often safe already: it stops at the first safe sample. After ``n``
unsafe tries it returns the best one seen (first on ties). Same sampling defaults as Best-of-N.

Options: ``RejectionOptions`` (``n`` is the most tries: the budget). Tuning grid: ``grids.TUNING_GRIDS["rejection"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from saffron.methods.base import Method, MethodResult, RunContext
from saffron.methods.best_of_n import SamplingOptions
from saffron.methods.tree import argmax_first, extend


@dataclass(frozen=True, kw_only=True)
class RejectionOptions(SamplingOptions):
    method = "rejection"


class Rejection(Method[RejectionOptions]):
    name = "rejection"
    options_type = RejectionOptions
    budget = "n"
    uses = ("reward",)

    def run(self, ctx: RunContext) -> MethodResult:
        o, runner, session = self.config, ctx.policy, ctx.session
        reward = ctx.reward(self.name)
        seen: list[tuple[int, ...]] = []
        rewards: list[float] = []
        for _ in range(o.n):
            sample = extend(runner, session.context_ids, [()], o.max_new_tokens, ctx.limits, o.temperature,
                            o.top_p, ctx.gen)[0]
            seen.append(sample.tokens)
            rewards.append(reward.score_outputs(session, runner.model, [sample.tokens])[0])
            if rewards[-1] > 0:
                break
        best = len(rewards) - 1 if rewards[-1] > 0 else argmax_first(rewards)
        return MethodResult(seen[best], ctx.meter.delta(),
                            {"n_reward_calls": len(rewards), "rewards": rewards, "chosen": best,
                             "accepted": rewards[-1] > 0})
