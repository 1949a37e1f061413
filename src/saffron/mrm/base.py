"""What every MRM shares: the abstract ``Mrm``, its manifest (``saffron.json``) and the fingerprints that bind an
MRM to the policy it may guide.

An MRM (multifurcation reward model) returns, in one call, the predicted reward ``M(s)[a] ~ R(s + a)`` of every
next token ``a`` after a response ``s``. Two kinds implement it: the paper's LoRA MRM (``lora.py``: a model of its
own) and the head MRM (``head.py``: a small network on the policy's hidden states). The head PRM (``prm.py``) is
not an MRM but is stored in the same format. ``registry.py`` loads any of them by name or folder.

Fingerprints. An MRM's outputs index the policy's vocabulary, so every MRM records its tokenizer's fingerprint
(``tokenizer_fingerprint``); a head reads the policy's hidden states, so it also records a sample of that policy's
weights (``policy_fingerprint``), compared with a tolerance that any of fp32/bf16/fp16 passes (``same_policy``).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saffron.errors import SaffronError
from saffron.model import Model
from saffron.runner import Runner
from saffron.store import atomic_write_json
from saffron.vocab import same_vocab

MANIFEST = "saffron.json"
DEFAULT_TEMPLATE = "\n\nUser: {prompt}\n\nAgent:"
UNSEEN_PENALTY = -1024.0


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of the vocabulary (token -> id) and special tokens: equal iff two tokenizers read text alike."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tok.all_special_tokens)
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class MrmManifest:
    """``saffron.json``: what an MRM folder holds and how it was made (its format is the shipped assets')."""

    base_model: str  # the LoRA MRM's backbone; for a head, the policy it reads
    tokenizer_sha256: str  # ``tokenizer_fingerprint`` of that model
    template: str = DEFAULT_TEMPLATE  # the LoRA MRM's input: bos + template(prompt) + response tokens
    reward_model: str | None = None  # the reward model the training corpus was annotated with
    penalty: float = UNSEEN_PENALTY  # the reward of a token never supervised (the conservative mask)
    lora_r: int = 4
    lora_alpha: int = 4
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    corpus: dict[str, Any] = field(default_factory=dict)  # the training corpus's figures
    train: dict[str, Any] = field(default_factory=dict)  # the training run's options, losses and environment
    format_version: int = 1
    # "lora": its own backbone (lora.py); "head": reads the policy's states (head.py); "prm": not an MRM but
    # the head PRM (prm.py), a value head for the baselines stored in the same format
    kind: str = "lora"
    head: dict[str, Any] = field(default_factory=dict)  # kinds "head", "prm": layers, width, policy fingerprint


def read_manifest(path: Path) -> MrmManifest | None:
    """The manifest of an MRM folder; None for a folder without one (the authors' released LoRA MRM)."""
    p = path / MANIFEST
    if not p.is_file():
        return None
    try:
        return MrmManifest(**json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise SaffronError(f"{p} is not a valid MRM manifest ({e})") from None


def write_manifest(path: Path, manifest: MrmManifest) -> None:
    """Write ``path/saffron.json`` atomically."""
    atomic_write_json(path / MANIFEST, asdict(manifest))


def load_vector(path: Path) -> torch.Tensor:
    """A 1-D tensor file of an MRM folder (a bias, the unseen mask); a missing or damaged file is a clear error."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
        t = t.detach() if isinstance(t, torch.Tensor) else t
    except FileNotFoundError:
        raise SaffronError(f"MRM file missing: {path}") from None
    except Exception as e:
        raise SaffronError(f"MRM file {path} is corrupted ({type(e).__name__})") from None
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise SaffronError(f"MRM file {path} does not hold a 1-D tensor")
    return t


class Mrm(ABC):
    """A loaded MRM: ``rewards`` returns ``[B, V]`` predicted rewards, the conservative mask applied.

    ``policy_layers`` name the policy hidden states (runner indexing) the MRM reads instead of running a model
    of its own; empty for an MRM with its own backbone. A search that runs the policy anyway passes those states
    as ``policy_hidden``, so the MRM costs only its head (``head.py``)."""

    manifest: MrmManifest
    model: Model  # the backbone whose tokenizer the MRM's outputs index
    unseen: torch.Tensor
    runner: Runner
    policy_layers: tuple[int, ...] = ()

    @property
    def flops(self) -> int:
        return self.runner.flops

    @abstractmethod
    def rewards(self, prompt: str, responses: Sequence[Sequence[int]], policy_hidden: torch.Tensor | None = None,
                raw: bool = False) -> torch.Tensor:
        """Predicted reward of every next token after each response (policy token ids, prefill excluded).
        ``raw`` skips the conservative mask (benchmarks read unseen tokens' raw outputs too)."""

    def check_policy(self, policy: Model) -> None:
        """Refuse to guide a policy this MRM cannot read: by default one whose tokenizer differs."""
        self.check_tokenizer(policy)

    def check_tokenizer(self, policy: Model) -> None:
        """Refuse to guide a policy whose tokenizer differs: the MRM's outputs index the policy's vocabulary."""
        if not same_vocab(policy.tokenizer, self.model.tokenizer):
            raise SaffronError(f"the MRM was trained for the tokenizer of {self.manifest.base_model}, which differs "
                               f"from the policy {policy.name}'s; train an MRM for this policy with "
                               f"`saffron train-mrm --base-model {policy.name}`")


# --- the policy a head reads -------------------------------------------------------------------------------------

FINGERPRINT_SAMPLE = 256  # weight values kept per manifest: enough to tell two checkpoints apart, small to store
# bf16 keeps 8 mantissa bits (relative error <= 2^-8), fp16 10 bits but flushes |x| < 6e-5 to subnormals: a value
# read in any of fp32/bf16/fp16 stays within this of its fp32 self, while another checkpoint's weights do not
FINGERPRINT_RTOL, FINGERPRINT_ATOL = 1e-2, 1e-4


def _weight_tensors(model: Model) -> list[torch.Tensor]:
    hf = model.hf
    return [hf.get_input_embeddings().weight[::997], hf.model.norm.weight,
            hf.model.layers[-1].mlp.down_proj.weight[::97]]


def _tokenizer_shape_hash(model: Model) -> hashlib._Hash:
    h = hashlib.sha256(tokenizer_fingerprint(model.tokenizer).encode())
    h.update(repr((model.hf.config.num_hidden_layers, model.hf.config.hidden_size)).encode())
    return h


def policy_fingerprint(model: Model) -> dict[str, Any]:
    """What identifies the policy a head reads, whatever dtype or device it was loaded in: a hash of its tokenizer
    and shape (exact), and a fixed sample of its weights (compared with a tolerance by ``same_policy``). A hash of
    the weights themselves would change with the dtype: a head trained in fp32 would refuse the same model in
    bf16."""
    flat = torch.cat([t.detach().float().cpu().flatten() for t in _weight_tensors(model)])
    idx = torch.linspace(0, len(flat) - 1, FINGERPRINT_SAMPLE).long()
    return {"tokenizer_shape": _tokenizer_shape_hash(model).hexdigest(), "weights": [float(x) for x in flat[idx]]}


def _legacy_fingerprint(model: Model) -> str:
    h = _tokenizer_shape_hash(model)
    for t in _weight_tensors(model):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def same_policy(model: Model, stored: Any) -> bool:
    """Whether ``model`` is the policy whose ``policy_fingerprint`` was stored (any dtype, any device)."""
    if isinstance(stored, str):  # a manifest from before dtype-free fingerprints: exact, so fp32 only
        return stored == _legacy_fingerprint(model)
    if not isinstance(stored, dict) or "weights" not in stored:
        return False
    mine = policy_fingerprint(model)
    if mine["tokenizer_shape"] != stored.get("tokenizer_shape") or len(stored["weights"]) != FINGERPRINT_SAMPLE:
        return False
    a, b = torch.tensor(stored["weights"]), torch.tensor(mine["weights"])
    return bool(((a - b).abs() <= FINGERPRINT_RTOL * a.abs() + FINGERPRINT_ATOL).all())
