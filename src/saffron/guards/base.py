"""The reward-model interface and the Llama-Guard-shaped prompt every guard here uses.

A guard reads ``HEAD(prompt) + response + TAIL`` and answers at the final position. The three pieces are
tokenised separately and concatenated, so scoring a longer prefix of the same response re-uses the runner's
cached ``HEAD + prefix`` and only pays for the new response tokens plus the fixed tail, as with Llama Guard.

The head's fixed instructions (everything before the user's prompt) are the same for every prompt: a guard
computes them once at construction and keeps them in its runner across ``reset`` (``Runner.keep``), as a
serving system's prefix cache would. Their cost is ``setup_flops``, paid once per guard, not per prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saffron.errors import SaffronError
from saffron.model import Model
from saffron.runner import Runner

if TYPE_CHECKING:
    from saffron.session import Session


@dataclass(frozen=True)
class GuardPrompt:
    """How a guard wraps a conversation: ``head`` holds a ``{prompt}`` slot; ``tail`` follows the response."""

    head: str
    tail: str
    bos: str = ""  # text tokenised before the head (its special tokens), if the template has one

    def ids(self, model: Model, prompt: str, response: str) -> list[int]:
        return (model.encode(self.bos + self.head.replace("{prompt}", prompt)) + model.encode(response)
                + model.encode(self.tail))


# Prompts that share nothing after the instructions, whatever the tokenizer merges at the ``{prompt}`` boundary:
# a letter, a capital with digits and punctuation, a newline. Their guard sequences agree exactly on the
# prefix every prompt's sequence starts with.
PROBE_PROMPTS = ("a", "Zebra 123?", "\n!")


class RewardModel(ABC):
    """Scores (prompt, response) pairs through a runner; ``flops`` accumulates what the scoring cost, fixed
    instructions kept at construction excepted (``setup_flops``)."""

    name: str
    runner: Runner

    @property
    def flops(self) -> int:
        return self.runner.flops

    @property
    def setup_flops(self) -> int:
        """FLOPs spent once on the kept fixed prefix (0 for a guard that keeps none)."""
        return self.runner.stats.setup_flops

    def reset(self) -> None:
        """Forget per-prompt cache state (the kept fixed prefix stays); called before each prompt is judged."""
        self.runner.reset()

    def fixed_prefix(self) -> list[int]:
        """The tokens every guard sequence starts with, whatever the prompt and response: the longest common
        prefix of the sequences of very different prompts, so it never includes a token the prompt could merge
        into."""
        seqs = [self.guard_ids(p, "x") for p in PROBE_PROMPTS]
        n = 0
        while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
            n += 1
        return seqs[0][:n]

    def keep_fixed_prefix(self) -> int:
        """Compute ``fixed_prefix`` once and keep it in the runner (see ``Runner.keep``); return its length."""
        return self.runner.keep(self.fixed_prefix())

    @abstractmethod
    def readout(self, prompt_ids_batch: list[list[int]]) -> torch.Tensor:
        """Rewards for a batch of full guard-prompt token sequences."""

    @abstractmethod
    def guard_ids(self, prompt: str, response: str) -> list[int]: ...

    def score(self, prompt: str, responses: Sequence[str]) -> list[float]:
        """Rewards of several responses (full or partial) to one prompt."""
        if not responses:
            return []
        seqs = [self.guard_ids(prompt, r) for r in responses]
        return [float(x) for x in self.readout(seqs)]

    def score_outputs(self, session: Session, policy: Model, outputs: Sequence[Sequence[int]]) -> list[float]:
        """Rewards of a search's outputs (``policy`` token ids, prefill excluded). What the methods call: a guard
        judges the decoded text (``score``); a reward model on the policy's states (the head PRM) reads the ids
        as the policy did, prefill included, and refuses a policy it cannot read."""
        return self.score(session.prompt, [policy.decode(o) for o in outputs])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [float(x) for x in self.readout([self.guard_ids(p, r) for p, r in pairs])]


class LogitPairGuard(RewardModel):
    """Reward = logit(safe token) - logit(unsafe token) at the first answer position."""

    def __init__(self, name: str, model: Model, prompt: GuardPrompt, safe_word: str, unsafe_word: str) -> None:
        self.name = name
        self.model = model
        self.prompt = prompt
        self.runner = Runner(model)
        self.safe_id = single_token(model, safe_word)
        self.unsafe_id = single_token(model, unsafe_word)
        if self.safe_id == self.unsafe_id:
            raise SaffronError(f"{name}: '{safe_word}' and '{unsafe_word}' map to the same token")
        self.keep_fixed_prefix()

    def guard_ids(self, prompt: str, response: str) -> list[int]:
        return self.prompt.ids(self.model, prompt, response)

    def readout(self, prompt_ids_batch: list[list[int]]) -> torch.Tensor:
        lg = self.runner.forward(prompt_ids_batch).logits
        assert lg is not None
        return lg[:, self.safe_id] - lg[:, self.unsafe_id]


def single_token(model: Model, word: str) -> int:
    """The id of ``word`` as the first token of an answer, looked up in the tokenizer (never hard-coded)."""
    ids = model.encode(word)
    if len(ids) != 1:
        raise SaffronError(f"'{word}' is not a single token in {model.name}'s tokenizer (got {len(ids)} tokens)")
    return ids[0]
