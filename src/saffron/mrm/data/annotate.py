"""Annotation: the safety reward model's score of every prefix of a response, ``rewards[j-1] = R(prompt, s[:j])``.

What R sees. A reward model here is a Llama-Guard-shaped guard (``guards/base.py``) reading
``HEAD(prompt) + response + TAIL``. We build those sequences as head ids + the response prefix's ids in the
reward model's tokenizer + tail ids, so all prefixes of one response share ``HEAD + s[:j]`` in the runner's
radix cache: a batch of prefixes costs each response token once plus one tail per prefix. When the reward model
shares the policy's tokenizer (the embedded stack: smol-guard on SmolLM2) the policy ids are used directly, i.e.
R scores exactly the tokens the policy produced (``decode`` -> ``encode`` is not always the identity); otherwise
the decoded prefix text is re-encoded in the reward model's tokenizer (a prefix that ends inside a multi-byte
character then decodes with a replacement character, as it would at search time).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from saffron.errors import SaffronError
from saffron.guards.base import GuardPrompt, RewardModel
from saffron.guards.registry import load_guard
from saffron.model import Model
from saffron.mrm.base import tokenizer_fingerprint
from saffron.runner import Runner

DEFAULT_REWARD = "smol-guard"
DEFAULT_CHUNK = 64  # prefixes per reward-model batch
CACHE_RESET_TOKENS = 16384  # reset the reward model's cache past this many stored tokens (bounds memory)


def load_reward(reward: str | RewardModel) -> tuple[RewardModel, str]:
    """The reward model for a guard spec (``load_guard``) or an instance, and the name the manifest records."""
    if isinstance(reward, RewardModel):
        return reward, reward.name
    return load_guard(reward), reward


def reward_identity(rm: RewardModel) -> dict[str, Any]:
    """What makes two reward models score alike: name, backbone, tokenizer, prompt and (for probes) weights."""
    ident: dict[str, Any] = {"name": rm.name, "class": type(rm).__name__}
    model = getattr(rm, "model", None)
    if isinstance(model, Model):
        ident["model"] = model.name
        ident["tokenizer_sha256"] = tokenizer_fingerprint(model.tokenizer)
    prompt = getattr(rm, "prompt", None)
    if isinstance(prompt, GuardPrompt):
        ident["prompt_sha256"] = _sha(json.dumps([prompt.bos, prompt.head, prompt.tail]))
    probe = getattr(rm, "probe", None)
    if isinstance(probe, torch.nn.Module):
        h = hashlib.sha256()
        for k, v in sorted(probe.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        spec = getattr(rm, "spec", None)
        h.update(repr(getattr(spec, "layers", None)).encode())
        ident["probe_sha256"] = h.hexdigest()
    for k in ("safe_id", "unsafe_id"):
        if hasattr(rm, k):
            ident[k] = int(getattr(rm, k))
    return ident


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Annotator:
    """Scores every prefix of a response with a reward model, through its runner's prefix cache."""

    def __init__(self, rm: RewardModel, policy: Model, chunk: int = DEFAULT_CHUNK,
                 cache_reset_tokens: int = CACHE_RESET_TOKENS) -> None:
        if chunk < 1:
            raise SaffronError(f"chunk must be >= 1, got {chunk}")
        self.rm = rm
        self.policy = policy
        self.chunk = chunk
        self.cache_reset_tokens = cache_reset_tokens
        rm_model = getattr(rm, "model", None)
        prompt = getattr(rm, "prompt", None)
        self.rm_model: Model | None = rm_model if isinstance(rm_model, Model) else None
        self.guard_prompt: GuardPrompt | None = prompt if isinstance(prompt, GuardPrompt) else None
        self.same_tokenizer = (self.rm_model is not None
                               and tokenizer_fingerprint(self.rm_model.tokenizer)
                               == tokenizer_fingerprint(policy.tokenizer))
        self.tail: list[int] = []
        if self.rm_model is not None and self.guard_prompt is not None:
            self.tail = self.rm_model.encode(self.guard_prompt.tail)
        self.calls = 0  # reward-model readouts (batches)
        self.scored = 0  # prefixes scored

    def sequences(self, prompt: str, ids: Sequence[int]) -> list[list[int]]:
        """The reward model's input for every prefix ``ids[:j]``, j = 1..len(ids)."""
        ids = list(ids)
        return self.sequences_of(prompt, [ids[:j] for j in range(1, len(ids) + 1)])

    def sequences_of(self, prompt: str, responses: Sequence[Sequence[int]]) -> list[list[int]]:
        """The reward model's input for each response (policy token ids): all share the head's cached ids."""
        if self.rm_model is not None and self.guard_prompt is not None:
            gp, m = self.guard_prompt, self.rm_model
            head = m.encode(gp.bos + gp.head.replace("{prompt}", prompt))
            if self.same_tokenizer:
                mids = [list(r) for r in responses]
            else:
                mids = [m.encode(self.policy.decode(r)) for r in responses]
            return [head + mid + self.tail for mid in mids]
        # a reward model of unknown shape: its own guard_ids on the decoded response text
        return [self.rm.guard_ids(prompt, self.policy.decode(r)) for r in responses]

    def score(self, prompt: str, responses: Sequence[Sequence[int]]) -> list[float]:
        """R(prompt, response) for each response (policy token ids), ``chunk`` sequences per readout."""
        seqs = self.sequences_of(prompt, responses)
        out: list[float] = []
        for i in range(0, len(seqs), self.chunk):
            r = self.rm.readout(seqs[i: i + self.chunk])
            self.calls += 1
            out.extend(float(x) for x in r.detach().float().cpu().flatten())
        self.scored += len(seqs)
        return out

    def rewards(self, row_id: str, prompt: str, ids: Sequence[int]) -> list[float]:
        """R(prompt, ids[:j]) for j = 1..len(ids); a non-finite reward is an error naming the row."""
        ids = list(ids)
        out = self.score(prompt, [ids[:j] for j in range(1, len(ids) + 1)])
        if len(out) != len(ids):
            raise SaffronError(f"reward model {self.rm.name} returned {len(out)} rewards for {len(ids)} prefixes "
                               f"(row {row_id})")
        bad = [j for j, x in enumerate(out) if not math.isfinite(x)]
        if bad:
            raise SaffronError(f"reward model {self.rm.name} returned a non-finite reward ({out[bad[0]]}) for row "
                               f"{row_id}, prefix of {bad[0] + 1} tokens")
        runner = getattr(self.rm, "runner", None)
        if isinstance(runner, Runner) and runner.trie.stats.stored_tokens > self.cache_reset_tokens:
            runner.reset()
        return out
