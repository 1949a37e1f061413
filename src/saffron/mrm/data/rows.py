"""One row of the reward corpus: a conversation's response tokens and the reward after each of them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardRow:
    """One annotated conversation: ``rewards[j]`` is R(prompt, response_ids[:j+1]).

    ``prompt_ids`` is what the LoRA MRM reads before the response (bos + template(prompt)), ``response_ids`` the
    response in the policy's tokenizer, ``complete`` whether the response ended within ``max_tokens``."""

    id: str
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    rewards: list[float]
    source: str
    complete: bool = False
