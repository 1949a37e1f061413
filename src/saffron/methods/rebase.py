"""Rebase-style reward-guided tree search: the tree-search baseline that pays one reward call per child.

Each step, every active node expands sampled children of ``chunk_tokens`` tokens each (the children's first
tokens are distinct, drawn without replacement from the tempered top-p nucleus; the rest of each chunk is sampled
in lockstep), the reward model scores EVERY explored child on its partial output (one batched call per step), and
the survivors form the next step's beam. This is the exploration-efficiency dilemma the paper measures: K children
cost K reward evaluations. The answer is the surviving node with the highest reward (first on ties).

How many children each node gets (``expansion``):

- ``beam`` (default): plain PRM beam search, the paper's "Rebase" row: ``children`` per node, then the global top
  ``width`` of finished-carried-over nodes plus children survive.
- ``balanced``: REBASE's reward-balanced expansion (Wu et al. 2024, "Inference Scaling Laws", section 3): at
  each depth the remaining width (``width`` minus the finished nodes) is allotted to the active nodes in
  proportion to ``softmax(reward / balance_temperature)`` (``allot``: largest remainders, so the counts sum to the
  remaining width exactly), and each node samples that many children; a node allotted none is dropped. A high
  temperature spreads the width evenly, a low one gives it all to the best node. No further pruning: the children
  are the next beam. (REBASE samples children independently; here they are distinct, so a node whose nucleus is
  smaller than its share gets fewer.)

Options (defaults): ``width`` (4, the budget), ``expansion`` (beam), ``children`` (2; beam only),
``balance_temperature`` (1.0, in reward units: the guards' log-odds; balanced only), ``chunk_tokens`` (1),
``max_new_tokens`` (32), ``min_new_tokens`` (the shared 16), ``temperature`` (0.7), ``top_p`` (0.9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from saffron.errors import SaffronError
from saffron.methods.base import (
    FlopMeter,
    Method,
    MethodResult,
    Stack,
    check_choice,
    check_float,
    check_int,
    check_lengths,
    require_reward,
)
from saffron.methods.sampling import check_sampling, choose_distinct
from saffron.methods.tree import Limits, Node, extend, policy_logits, prune
from saffron.session import Session

EXPANSIONS = ("beam", "balanced")


def allot(width: int, rewards: Sequence[float], temperature: float) -> list[int]:
    """REBASE's reward-balanced split of ``width`` children over nodes: shares ``softmax(rewards / temperature)``,
    rounded by largest remainders (ties to the earlier node) so the counts sum to ``width`` exactly. A node with
    no reward yet (-inf: the root) weighs as much as the others when none has one, else nothing."""
    if width <= 0 or not rewards:
        return [0] * len(rewards)
    finite = [r for r in rewards if math.isfinite(r)]
    if not finite:
        weights = [1.0] * len(rewards)
    else:
        top = max(finite)
        weights = [math.exp((r - top) / temperature) if math.isfinite(r) else 0.0 for r in rewards]
    total = sum(weights)
    exact = [width * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(rewards)), key=lambda i: -(exact[i] - counts[i]))  # stable: earlier first
    for i in by_remainder[: width - sum(counts)]:
        counts[i] += 1
    return counts


class Rebase(Method):
    name = "rebase"
    budget = "width"
    uses = ("reward",)

    def __init__(self, width: int = 4, children: int | None = None, chunk_tokens: int = 1, max_new_tokens: int = 32,
                 min_new_tokens: int | None = None, temperature: float = 0.7, top_p: float = 0.9,
                 expansion: str = "beam", balance_temperature: float = 1.0) -> None:
        check_int("width", width)
        check_choice("expansion", expansion, EXPANSIONS)
        if expansion == "balanced" and children is not None:
            raise SaffronError("children applies to expansion='beam' only; balanced expansion allots the width by "
                               "reward")
        children = 2 if children is None and expansion == "beam" else children
        if children is not None:
            check_int("children", children)
        if check_float("balance_temperature", balance_temperature) <= 0:
            raise SaffronError(f"balance_temperature must be > 0, got {balance_temperature}")
        self.expansion, self.balance_temperature = expansion, float(balance_temperature)
        check_int("chunk_tokens", chunk_tokens)
        min_new_tokens = check_lengths(max_new_tokens, min_new_tokens)
        check_sampling(temperature, top_p)
        self.width, self.children, self.chunk_tokens = width, children, chunk_tokens
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.temperature, self.top_p = temperature, top_p

    def options(self) -> dict[str, Any]:
        return {"width": self.width, "expansion": self.expansion, "children": self.children,
                "balance_temperature": self.balance_temperature, "chunk_tokens": self.chunk_tokens,
                "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p}

    def run(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        reward = require_reward(stack, self.name)
        runner = stack.policy
        meter = FlopMeter(policy=runner, reward=reward)
        gen = torch.Generator().manual_seed(seed)
        limits = Limits(runner.model.eos_ids, self.min_new_tokens, self.max_new_tokens)
        ctx = session.context_ids
        beam = [Node(())]
        calls = explored = 0
        allotted: list[list[int]] = []  # per step, children given to each active node
        while active := [n for n in beam if not n.done(self.max_new_tokens)]:
            logits = policy_logits(runner, ctx, [n.tokens for n in active], limits)
            done = [n for n in beam if n.done(self.max_new_tokens)]
            if self.expansion == "balanced":
                counts = allot(self.width - len(done), [n.reward for n in active], self.balance_temperature)
            else:
                counts = [self.children or 0] * len(active)
            allotted.append(counts)
            firsts: list[Node] = []
            for node, row, k in zip(active, logits, counts, strict=True):
                if k == 0:  # balanced: a node allotted no child is dropped
                    continue
                for t in choose_distinct(row, k, self.temperature, self.top_p, gen):
                    firsts.append(Node(node.tokens, finished=True) if t in limits.eos else Node(node.tokens + (t,)))
            firsts = list(dict.fromkeys(firsts))  # several EOS ids make identical finished children
            grow = [i for i, c in enumerate(firsts) if not c.finished]
            grown = extend(runner, ctx, [firsts[i].tokens for i in grow], self.chunk_tokens - 1, limits,
                           self.temperature, self.top_p, gen)
            for i, g in zip(grow, grown, strict=True):
                firsts[i] = g
            scores = reward.score_outputs(session, runner.model, [c.tokens for c in firsts])
            children = [Node(c.tokens, r, c.finished) for c, r in zip(firsts, scores, strict=True)]
            calls += 1
            explored += len(children)
            beam = prune(done + children, self.width)  # balanced: at most width nodes already, only sorted
        return MethodResult(beam[0].tokens, meter.delta(),
                            {"n_reward_calls": calls, "explored_children": explored,
                             "final_rewards": [n.reward for n in beam], "allotted": allotted})
