"""Whether two tokenizers are interchangeable for a model that indexes another's vocabulary (an MRM's outputs
are rewards per policy token id): the same ordinary token-to-id mapping over the same id range.

Special tokens are compared by id range only, not by name: checkpoints of one vocabulary rename reserved special
tokens between releases (Llama 3.0's ``<|reserved_special_token_2|>`` is Llama 3.2's ``<|eom_id|>``, same id),
and a name check would refuse a Llama-Guard-3-1B-based MRM for a Llama 3.0 policy that reads text exactly alike.
"""

from __future__ import annotations

from typing import Any


def ordinary_vocab(tok: Any) -> dict[str, int]:
    """The token -> id mapping without the special (added) tokens."""
    special = {str(t.content) for t in tok.added_tokens_decoder.values() if t.special}
    return {t: i for t, i in tok.get_vocab().items() if t not in special}


def same_vocab(a: Any, b: Any) -> bool:
    """Whether tokenizers ``a`` and ``b`` map text to the same ids and span the same id range."""
    return a is b or (len(a) == len(b) and ordinary_vocab(a) == ordinary_vocab(b))
