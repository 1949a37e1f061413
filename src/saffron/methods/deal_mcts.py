"""DeAL-style MCTS: decoding as a search in which every token is committed after a small tree search.

At each step, from the committed output, ``simulations`` iterations of: select (UCT with constant ``c``; a
node's unvisited children first, in policy order), expand (the node's ``top_k`` policy tokens become its
children, one policy call), evaluate (the reward model on the child's output extended by a ``lookahead`` of L
policy tokens, greedy by default; L = 0 scores the child itself), backpropagate (visits and reward sums up the
path). Then the most-visited child is committed (ties: higher mean reward, then policy order) and its subtree
is kept for the next step. A node's evaluation is cached, so revisiting a finished node costs no reward call.
Rewards are the reward model's raw values (a logit difference for the guards here), so ``c`` is in those units.

Lookahead (DeAL's, and the paper's Table 1 with L = 0 and 2): with ``lookahead=L > 0`` a freshly expanded child is
scored on its output continued by L policy tokens (greedy unless ``temperature`` > 0), so the reward model judges
where the token leads rather than the token alone; the rollout's tokens are not kept in the tree, and their
policy compute is charged. L = 0 scores the child as it is.

Options (defaults): ``simulations`` (8, the budget), ``top_k`` (4), ``c`` (1.0), ``lookahead`` (0),
``max_new_tokens`` (32), ``min_new_tokens`` (the shared 16), ``temperature`` / ``top_p`` (0 / 1: the lookahead's
sampling). Tuning grid: ``grids.TUNING_GRIDS["deal-mcts"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from saffron.guards.base import RewardModel
from saffron.methods.base import (
    FlopMeter,
    Method,
    MethodResult,
    Stack,
    check_float,
    check_int,
    check_lengths,
    require_reward,
)
from saffron.methods.sampling import check_sampling, choose_distinct
from saffron.methods.tree import Limits, extend, policy_logits
from saffron.runner import Runner
from saffron.session import Session


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    finished: bool = False
    children: list[_Node] = field(default_factory=list)
    expanded: bool = False
    visits: int = 0
    total: float = 0.0
    value: float | None = None  # this node's own evaluation, computed once

    @property
    def mean(self) -> float:
        return self.total / self.visits if self.visits else 0.0


class DealMcts(Method):
    name = "deal-mcts"
    budget = "simulations"
    uses = ("reward",)

    def __init__(self, simulations: int = 8, top_k: int = 4, c: float = 1.0, lookahead: int = 0,
                 max_new_tokens: int = 32, min_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0) -> None:
        """``temperature``/``top_p`` apply to the lookahead rollouts only (0 = greedy); expansion is top-k."""
        check_int("simulations", simulations)
        check_int("top_k", top_k)
        check_float("c", c)
        check_int("lookahead", lookahead, lo=0)
        min_new_tokens = check_lengths(max_new_tokens, min_new_tokens)
        check_sampling(temperature, top_p)
        self.simulations, self.top_k, self.c, self.lookahead = simulations, top_k, float(c), lookahead
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.temperature, self.top_p = temperature, top_p

    def options(self) -> dict[str, Any]:
        return {"simulations": self.simulations, "top_k": self.top_k, "c": self.c, "lookahead": self.lookahead,
                "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p}

    def run(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        reward = require_reward(stack, self.name)
        runner = stack.policy
        meter = FlopMeter(policy=runner, reward=reward)
        search = _Search(self, runner, reward, session, torch.Generator().manual_seed(seed))
        root = _Node(())
        while not search.terminal(root):
            for _ in range(self.simulations):
                search.simulate(root)
            root = max(root.children, key=lambda ch: (ch.visits, ch.mean))  # max keeps the first on ties
        return MethodResult(root.tokens, meter.delta(),
                            {"n_reward_calls": search.reward_calls, "n_expansions": search.expansions})


class _Search:
    def __init__(self, opts: DealMcts, runner: Runner, reward: RewardModel, session: Session,
                 gen: torch.Generator) -> None:
        self.o, self.runner, self.reward, self.session, self.gen = opts, runner, reward, session, gen
        self.limits = Limits(runner.model.eos_ids, opts.min_new_tokens, opts.max_new_tokens)
        self.reward_calls = self.expansions = 0

    def terminal(self, node: _Node) -> bool:
        return node.finished or len(node.tokens) >= self.o.max_new_tokens

    def simulate(self, root: _Node) -> None:
        path, node = [root], root
        while not self.terminal(node):
            if not node.expanded:
                self.expand(node)
            fresh = [ch for ch in node.children if ch.visits == 0]
            node = fresh[0] if fresh else max(node.children, key=lambda ch: self.uct(node, ch))
            path.append(node)
            if fresh:
                break
        value = self.evaluate(node)
        for n in path:
            n.visits += 1
            n.total += value

    def uct(self, parent: _Node, child: _Node) -> float:
        return child.mean + self.o.c * math.sqrt(math.log(parent.visits) / child.visits)

    def expand(self, node: _Node) -> None:
        row = policy_logits(self.runner, self.session.context_ids, [node.tokens], self.limits)[0]
        eos_seen = False
        for t in choose_distinct(row, self.o.top_k, 0.0, 1.0, self.gen):
            if t in self.limits.eos:
                if not eos_seen:  # several EOS ids would make identical finished children
                    node.children.append(_Node(node.tokens, finished=True))
                eos_seen = True
            else:
                node.children.append(_Node(node.tokens + (t,)))
        node.expanded = True
        self.expansions += 1

    def evaluate(self, node: _Node) -> float:
        if node.value is None:
            tokens = node.tokens
            if self.o.lookahead and not self.terminal(node):
                tokens = extend(self.runner, self.session.context_ids, [tokens], self.o.lookahead, self.limits,
                                self.o.temperature, self.o.top_p, self.gen)[0].tokens
            node.value = self.reward.score_outputs(self.session, self.runner.model, [tokens])[0]
            self.reward_calls += 1
        return node.value
