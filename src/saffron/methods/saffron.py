"""Saffron-1: beam search guided by the multifurcation reward model (paper, "The method", step 5).

One MRM call per step scores every child of every active node at once: that is what frees the search from the
one-reward-call-per-child cost of Rebase/DeAL. Step by step, as the authors' code does it (deterministic):

    beam = [root]; every node's reward = -inf
    for t in range(max_new_tokens):
        finished nodes (EOS) are carried over unchanged
        logits = policy(active nodes); EOS banned while t < min_new_tokens
        candidates = each active node's top-p nucleus of its logits (no temperature)
        q = MRM(active nodes), unseen tokens already at the penalty (-1024)
        keep the global top ``width`` candidates (node, token) by q[node, token]
        child.reward = q if token is EOS else parent.reward
        beam = finished + children, stable-sorted by reward, cut to ``width``

Unseen tokens are not removed, only ranked below every seen candidate (-1024): they fill the top ``width``
only when too few seen candidates exist, which is how EOS (unseen in the released mask) ever gets chosen. Ties
go to the earlier node, then the lower token id. Several EOS ids in one nucleus count as one candidate.

The running-reward rule is the paper's: a node's reward stays -inf until it ends, so with EOS unseen every
finished node ties at -1024 and the beam order carries no reward information (the paper note's [I]). Hence two
final rules: ``first`` is the authors' (highest running reward, first on ties: the first finished node, else
the first beam node, no reward model needed); ``rerank`` (default) scores every surviving node's full output
with the reward model in one batched call and returns the best (first on ties), the "better final rule" the
paper note invites us to add and measure.
"""

from __future__ import annotations

from typing import Any

import torch

from saffron.methods.base import (
    FlopMeter,
    Method,
    MethodResult,
    Stack,
    check_choice,
    check_int,
    check_lengths,
    require_mrm,
    require_reward,
)
from saffron.methods.sampling import check_sampling, nucleus_mask
from saffron.methods.tree import NEG_INF, Limits, Node, argmax_first, one_eos, policy_logits, prune
from saffron.session import Session

FINAL_RULES = ("rerank", "first")


class Saffron(Method):
    name = "saffron"
    budget = "width"
    uses = ("mrm", "reward")

    def __init__(self, width: int = 32, top_p: float = 0.8, max_new_tokens: int = 32, min_new_tokens: int = 16,
                 final: str = "rerank") -> None:
        check_int("width", width)
        check_sampling(0.0, top_p)
        check_lengths(max_new_tokens, min_new_tokens)
        check_choice("final", final, FINAL_RULES)
        self.width, self.top_p, self.final = width, top_p, final
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self._checked: set[tuple[int, int]] = set()

    def options(self) -> dict[str, Any]:
        return {"width": self.width, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "min_new_tokens": self.min_new_tokens, "final": self.final}

    def run(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        """Deterministic: ``seed`` is not used (the search draws nothing at random)."""
        mrm = require_mrm(stack, self.name)
        reward = require_reward(stack, f"{self.name} with final='rerank'") if self.final == "rerank" else None
        runner = stack.policy
        if (id(mrm), id(runner.model)) not in self._checked:  # hashing a vocabulary is not free: once per pair
            mrm.check_tokenizer(runner.model)
            self._checked.add((id(mrm), id(runner.model)))
        meter = FlopMeter(policy=runner, mrm=mrm, reward=reward)
        limits = Limits(runner.model.eos_ids, self.min_new_tokens, self.max_new_tokens)
        beam = [Node(())]
        steps = explored = 0
        for _ in range(self.max_new_tokens):
            finished = [n for n in beam if n.finished]
            active = [n for n in beam if not n.finished]
            if not active:
                break
            logits = policy_logits(runner, session.context_ids, [n.tokens for n in active], limits)
            q = mrm.rewards(session.prompt, [n.tokens for n in active]).to(logits.device)
            v = min(logits.shape[-1], q.shape[-1])  # padded embedding rows differ; a token past either is out
            q = q[:, :v]
            cand = one_eos(nucleus_mask(logits[:, :v], self.top_p), q, limits.eos)
            rows, toks = cand.nonzero(as_tuple=True)  # row-major: node order, then token id
            scores = q[rows, toks]
            top = torch.sort(scores, descending=True, stable=True).indices[: self.width]
            children = []
            for i in top.tolist():
                parent, tok, s = active[int(rows[i])], int(toks[i]), float(scores[i])
                if tok in limits.eos:
                    children.append(Node(parent.tokens, reward=s, finished=True))
                else:
                    children.append(Node(parent.tokens + (tok,), reward=parent.reward))
            beam = prune(finished + children, self.width)
            steps += 1
            explored += int(cand.sum())
        trace: dict[str, Any] = {"steps": steps, "n_mrm_calls": steps, "explored_children": explored,
                                 "finished": sum(n.finished for n in beam), "final": self.final,
                                 "beam_rewards": [n.reward if n.reward != NEG_INF else None for n in beam]}
        chosen = 0  # the beam is sorted: the first node has the highest running reward
        if reward is not None:
            scores_final = reward.score(session.prompt, [runner.model.decode(n.tokens) for n in beam])
            chosen = argmax_first(scores_final)
            trace.update(n_reward_calls=1, final_rewards=scores_final)
        trace["chosen"] = chosen
        return MethodResult(beam[chosen].tokens, meter.delta(), trace)
