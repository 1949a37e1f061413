"""The multifurcation reward model (MRM): one forward pass predicts the safety reward of every next token.

Modules, by lifecycle:

    base.py      the abstract ``Mrm``, its manifest (``saffron.json``), tokenizer and policy fingerprints
    lora.py      the paper's LoRA MRM                  head.py   the head MRM on the policy's hidden states
    prm.py       the head PRM (a reward model for the baselines, stored in the MRM format)
    registry.py  loading by embedded name or folder, ``saffron mrm inspect``
    data/        the token-level reward corpus (``saffron build-rewards``): rows, corpus, annotate, store, build
    train/       training (``saffron train-mrm``): common (data checks, supervision), lora, head
"""

from __future__ import annotations

from saffron.mrm.base import Mrm
from saffron.mrm.registry import EMBEDDED, EMBEDDED_MRM, check_mrm_spec, load_mrm, load_mrm_spec

__all__ = ["EMBEDDED", "EMBEDDED_MRM", "Mrm", "check_mrm_spec", "load_mrm", "load_mrm_spec"]
