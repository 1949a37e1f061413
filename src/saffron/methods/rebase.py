"""Rebase-style reward-guided beam search: the tree-search baseline that pays one reward call per child.

Each step, every active beam node expands ``children`` sampled children of ``chunk_tokens`` tokens each (the
children's first tokens are distinct, drawn without replacement; the rest of each chunk is sampled in lockstep),
the reward model scores EVERY explored child on its partial output (one batched call per step), and the global
top ``width`` of finished-carried-over nodes plus children survive. This is the exploration-efficiency dilemma
the paper measures: K children cost K reward evaluations. The answer is the surviving node with the highest
reward (first on ties).
"""

from __future__ import annotations

from typing import Any

import torch

from saffron.methods.base import FlopMeter, Method, MethodResult, Stack, check_int, check_lengths, require_reward
from saffron.methods.sampling import check_sampling, choose_distinct
from saffron.methods.tree import Limits, Node, extend, policy_logits, prune
from saffron.session import Session


class Rebase(Method):
    name = "rebase"
    budget = "width"
    uses = ("reward",)

    def __init__(self, width: int = 4, children: int = 2, chunk_tokens: int = 1, max_new_tokens: int = 32,
                 min_new_tokens: int | None = None, temperature: float = 0.7, top_p: float = 0.9) -> None:
        check_int("width", width)
        check_int("children", children)
        check_int("chunk_tokens", chunk_tokens)
        min_new_tokens = check_lengths(max_new_tokens, min_new_tokens)
        check_sampling(temperature, top_p)
        self.width, self.children, self.chunk_tokens = width, children, chunk_tokens
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.temperature, self.top_p = temperature, top_p

    def options(self) -> dict[str, Any]:
        return {"width": self.width, "children": self.children, "chunk_tokens": self.chunk_tokens,
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
        while active := [n for n in beam if not n.done(self.max_new_tokens)]:
            logits = policy_logits(runner, ctx, [n.tokens for n in active], limits)
            firsts: list[Node] = []
            for node, row in zip(active, logits, strict=True):
                for t in choose_distinct(row, self.children, self.temperature, self.top_p, gen):
                    firsts.append(Node(node.tokens, finished=True) if t in limits.eos else Node(node.tokens + (t,)))
            firsts = list(dict.fromkeys(firsts))  # several EOS ids make identical finished children
            grow = [i for i, c in enumerate(firsts) if not c.finished]
            grown = extend(runner, ctx, [firsts[i].tokens for i in grow], self.chunk_tokens - 1, limits,
                           self.temperature, self.top_p, gen)
            for i, g in zip(grow, grown, strict=True):
                firsts[i] = g
            scores = reward.score(session.prompt, [runner.model.decode(c.tokens) for c in firsts])
            children = [Node(c.tokens, r, c.finished) for c, r in zip(firsts, scores, strict=True)]
            calls += 1
            explored += len(children)
            beam = prune([n for n in beam if n.done(self.max_new_tokens)] + children, self.width)
        return MethodResult(beam[0].tokens, meter.delta(),
                            {"n_reward_calls": calls, "explored_children": explored,
                             "final_rewards": [n.reward for n in beam]})
