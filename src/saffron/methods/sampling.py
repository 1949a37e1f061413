"""Token choice from next-token logits: greedy, temperature, nucleus (top-p), one row or a batch of rows."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the smallest set of tokens whose probability mass reaches ``top_p`` (always >= 1).

    Tokens of probability 0 (banned with -inf) are never in it: float rounding leaves the cumulative mass a
    hair under 1, so ``top_p = 1`` alone would otherwise let some banned tokens in."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p >= 1:
        return probs > 0
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each token
    keep_sorted = (before < top_p) & (sorted_p > 0)
    keep_sorted[..., 0] = True
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(-1, order, keep_sorted)
    return mask


def ban(logits: torch.Tensor, ids: Iterable[int], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set the columns ``ids`` of ``[B, V]`` logits to -inf in place, in every row or only where the bool
    ``rows`` is True (EOS before ``min_new_tokens``); returns ``logits``."""
    cols = sorted(i for i in ids if 0 <= i < logits.shape[-1])
    if not cols:
        return logits
    c = torch.tensor(cols, dtype=torch.long, device=logits.device)
    if rows is None:
        logits[:, c] = float("-inf")
    else:
        r = rows.nonzero(as_tuple=True)[0]
        logits[r[:, None], c] = float("-inf")
    return logits


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution: softmax of ``logits / temperature`` restricted to its top-p nucleus."""
    lg = logits.float() / temperature
    if top_p < 1:
        lg = lg.masked_fill(~nucleus_mask(lg, top_p), float("-inf"))
    return torch.softmax(lg, dim=-1)


def _draw(probs: torch.Tensor, n: int, gen: torch.Generator, replacement: bool = True) -> torch.Tensor:
    """``torch.multinomial`` on the generator's device (the CPU): a CPU generator cannot draw from CUDA
    probabilities, and drawing on the CPU keeps a seed's tokens the same on every device."""
    return torch.multinomial(probs.to(gen.device), n, replacement=replacement, generator=gen)


def choose(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    return int(_draw(probabilities(logits, temperature, top_p), 1, gen))


def choose_rows(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> list[int]:
    """``choose`` for every row of ``[B, V]`` logits in one draw (lockstep sampling of a batch)."""
    if temperature == 0:
        return [int(t) for t in logits.argmax(dim=-1)]
    return [int(t) for t in _draw(probabilities(logits, temperature, top_p), 1, gen)[:, 0]]


def choose_distinct(logits: torch.Tensor, k: int, temperature: float, top_p: float,
                    gen: torch.Generator) -> list[int]:
    """Up to ``k`` distinct tokens from one ``[V]`` row: the top ``k`` when greedy, else drawn without
    replacement from the tempered nucleus (fewer when it is smaller). Distinct, so the children a search node
    expands are never copies of each other."""
    if temperature == 0:
        order = logits.float().sort(descending=True, stable=True).indices
        n = max(1, min(k, int(torch.isfinite(logits).sum())))
        return [int(t) for t in order[:n]]
    probs = probabilities(logits, temperature, top_p)
    n = min(k, int((probs > 0).sum()))
    return [int(t) for t in _draw(probs, n, gen, replacement=False)]
