"""No defence: the policy continues the attacked conversation on its own (greedy or sampled).

Options: ``max_new_tokens`` (32), ``min_new_tokens`` (EOS banned before it; default the shared
``DEFAULT_MIN_NEW_TOKENS``, as for every method, so the undefended row answers at the same length as the
defences), ``temperature`` (0: greedy) and ``top_p`` (1).
"""

from __future__ import annotations

from typing import Any

import torch

from saffron.methods.base import Method, MethodResult, Stack, check_lengths
from saffron.methods.sampling import check_sampling
from saffron.methods.tree import Limits, extend
from saffron.session import Session


class NoDefence(Method):
    name = "none"

    def __init__(self, max_new_tokens: int = 32, min_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0) -> None:
        self.min_new_tokens = check_lengths(max_new_tokens, min_new_tokens)
        check_sampling(temperature, top_p)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p

    def options(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p}

    def run(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        runner = stack.policy
        start = runner.flops
        # the same length rules and rollout as every other method (tree.Limits, tree.extend): one row
        limits = Limits(runner.model.eos_ids, self.min_new_tokens, self.max_new_tokens)
        out = extend(runner, session.context_ids, [()], self.max_new_tokens, limits, self.temperature, self.top_p,
                     torch.Generator().manual_seed(seed))[0]
        return MethodResult(output_ids=out.tokens, flops={"policy": runner.flops - start})
