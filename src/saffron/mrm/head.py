"""The head MRM: a multifurcation reward model that reads the policy's own hidden states.

The paper's MRM is a second LM (a LoRA-adapted guard) run beside the policy: every search step pays one forward
of it per active node. On the embedded stack that model is as large as the policy, so it doubles the cost of a
candidate. Yet the policy has just read the same response to propose the next tokens: its hidden states at a
few layers already encode the conversation. The head MRM is a small network on those states:

    f  = standardise(concat(policy hidden states at ``layers``, last position))
    z  = gelu(W1 f)                                  (``width`` units)
    q[a] = v(z) + <E[a] / |E[a]|, W2 z> + b[a]       for every token a the corpus supervised
    q[a] = penalty                                   for every other token (the conservative mask)

``v`` predicts the reward the response is heading for, ``W2 z`` scores each next token through the policy's own
(normalised, frozen) output embedding ``E`` so that similar tokens share what is learnt, and ``b`` is a bias
per token as in the paper's MRM. In a search the policy runner returns the hidden states with the logits (no
extra forward), so one MRM call costs ``2 (F w + w d + S d)`` FLOPs for ``S`` supervised tokens: about 8 MFLOP
per node on SmolLM2 against 335 MFLOP for the LoRA MRM. Called alone (``saffron bench mrm``), it runs the
policy through its own runner and counts that forward too.

It reads exactly one policy: the one it was trained on (checked by a fingerprint of that model's weights, not
only its tokenizer). The policy reads ``chat(prompt) + prefill + output``; training reads ``chat(prompt) +
response`` (the reward corpus stores no prefill), so a prefilled search shows it contexts it was not trained on,
as the LoRA MRM (which never sees the prefill) is not.

On disk: ``head.safetensors`` (the network and its feature statistics), ``unseen_mask.pt`` and ``saffron.json``
(``kind: "head"``; ``head``: layers, width, policy fingerprint). Training: ``train/head.py``.

In this package "head" means this network on the policy's states (the head MRM, and the head PRM built on its
``ValueNet``); the trainable bias on a LoRA MRM's LM head is ``train/lora.py``'s ``LmHeadBias``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saffron.errors import SaffronError
from saffron.flops import ArchSpec
from saffron.model import Model, load_model
from saffron.mrm.base import Mrm, MrmManifest, load_vector, read_manifest, same_policy, write_manifest
from saffron.runner import Runner
from saffron.store import atomic_write

WEIGHTS = "head.safetensors"
DEFAULT_LAYERS = (10, 14, 18, 22, 26, 30)
DEFAULT_WIDTH = 256


def head_flops(n_features: int, width: int, d_model: int, n_scored: int) -> int:
    """One node's FLOPs: inner layer, value, token projection and the scored tokens' dot products (the
    additions and the GELU are negligible)."""
    return 2 * (n_features * width + width + width * d_model + n_scored * d_model)


class ValueNet(torch.nn.Module):
    """``f -> v(gelu(W1 standardise(f))))``: the value part every head shares (the head PRM is this alone)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.inner = torch.nn.Linear(n_features, width)
        self.value = torch.nn.Linear(width, 1)

    def hidden(self, feats: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.inner((feats - self.mean) / self.std))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B]`` predicted reward of the prefix each row's states were read after."""
        out: torch.Tensor = self.value(self.hidden(feats)).squeeze(-1)  # a Module's __call__ is typed Any
        return out


class HeadNet(ValueNet):
    """``f -> q`` as in the module docstring; ``emb`` holds the normalised output embedding (not trained)."""

    emb: torch.Tensor

    def __init__(self, n_features: int, width: int, emb: torch.Tensor) -> None:
        super().__init__(n_features, width)  # creates inner, value, then token below: the RNG order of old files
        self.register_buffer("emb", emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-6), persistent=False)
        self.token = torch.nn.Linear(width, emb.shape[1], bias=False)
        torch.nn.init.zeros_(self.token.weight)  # start as a pure value head: every token scored alike
        self.bias = torch.nn.Parameter(torch.zeros(emb.shape[0]))

    def at(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Predicted reward of one token per row (training reads only the supervised pairs)."""
        z = self.hidden(feats)
        out: torch.Tensor = self.value(z).squeeze(-1) + (self.token(z) * self.emb[tokens]).sum(-1) + self.bias[tokens]
        return out

    def among(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` predicted rewards of each row's own ``C`` tokens (``tokens`` ``[B, C]``: a node's children)."""
        z = self.hidden(feats)
        out: torch.Tensor = (self.value(z) + torch.einsum("bcd,bd->bc", self.emb[tokens], self.token(z))
                             + self.bias[tokens])
        return out

    def over(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, len(tokens)]`` predicted rewards of the given tokens after each row."""
        z = self.hidden(feats)
        out: torch.Tensor = self.value(z) + self.token(z) @ self.emb[tokens].T + self.bias[tokens]
        return out


class HeadMrm(Mrm):
    """A head MRM bound to its policy (see the module docstring)."""

    def __init__(self, policy: Model, manifest: MrmManifest, net: HeadNet, unseen: torch.Tensor) -> None:
        if unseen.shape != (policy.vocab_size,) or net.bias.shape != (policy.vocab_size,):
            raise SaffronError(f"head MRM tensors have {unseen.shape[0]} entries but {policy.name} has a vocabulary "
                               f"of {policy.vocab_size}")
        self.model = policy
        self.manifest = manifest
        self.net = net.to(policy.device).eval()
        self.unseen = unseen.to(policy.device, torch.bool)
        self.seen = torch.nonzero(~self.unseen).squeeze(-1)
        self.policy_layers = tuple(int(x) for x in manifest.head["layers"])
        self.runner = Runner(policy)  # only for calls without the policy's states (benchmarks)
        self.head_flops = 0
        self.flops_per_node = head_flops(net.inner.in_features, net.inner.out_features, net.token.out_features,
                                         len(self.seen))

    @property
    def flops(self) -> int:
        return self.runner.flops + self.head_flops

    def check_policy(self, policy: Model) -> None:
        self.check_tokenizer(policy)
        if not same_policy(policy, self.manifest.head.get("policy_fingerprint")):
            raise SaffronError(f"this head MRM reads the hidden states of {self.manifest.base_model}, and the policy "
                               f"{policy.name} is another model (or the MRM predates dtype-free fingerprints); "
                               f"train a head MRM for it with `saffron train-mrm --kind head --base-model "
                               f"{policy.name}`")

    @torch.inference_mode()
    def rewards(self, prompt: str, responses: Sequence[Sequence[int]], policy_hidden: torch.Tensor | None = None,
                raw: bool = False) -> torch.Tensor:
        """With ``policy_hidden`` ([B, len(policy_layers), d], the policy runner's states after ``chat(prompt) +
        prefill + response``) nothing is run; without, the policy reads ``chat(prompt) + response`` here."""
        if not responses:
            return torch.empty((0, self.model.vocab_size), device=self.model.device)
        if policy_hidden is None:
            ctx = self.model.chat_prompt_ids(prompt)
            policy_hidden = self.runner.forward([ctx + list(r) for r in responses], logits=False,
                                                hidden_layers=self.policy_layers).hidden
            assert policy_hidden is not None
        if policy_hidden.shape[0] != len(responses) or policy_hidden.shape[1] != len(self.policy_layers):
            raise SaffronError(f"head MRM: expected hidden states [{len(responses)}, {len(self.policy_layers)}, d], "
                               f"got {list(policy_hidden.shape)}")
        feats = policy_hidden.float().flatten(1)
        self.head_flops += self.flops_per_node * len(responses)
        if raw:
            return self.net.over(feats, torch.arange(self.model.vocab_size, device=feats.device))
        out = torch.full((len(responses), self.model.vocab_size), self.manifest.penalty, device=feats.device)
        out[:, self.seen] = self.net.over(feats, self.seen)
        return out


def load_head_mrm(path: Path, base_model: str | None = None, device: str | None = None) -> HeadMrm:
    manifest = read_manifest(path)
    assert manifest is not None and manifest.kind == "head"
    policy = load_model(base_model or manifest.base_model, device)
    try:
        state = load_file(str(path / WEIGHTS))
        net = HeadNet(int(state["mean"].shape[0]), int(state["inner.weight"].shape[0]),
                      policy.hf.get_output_embeddings().weight.detach().float())
        net.load_state_dict(state)
    except FileNotFoundError:
        raise SaffronError(f"head MRM file missing: {path / WEIGHTS}") from None
    except Exception as e:
        raise SaffronError(f"head MRM in {path} is corrupted ({type(e).__name__}); retrain it with `saffron "
                           f"train-mrm --kind head`") from None
    mrm = HeadMrm(policy, manifest, net, load_vector(path / "unseen_mask.pt").bool())
    mrm.check_policy(policy)
    return mrm


def feature_runner(policy: Model, layers: Sequence[int]) -> Runner:
    """A runner that reads ``layers`` of ``policy`` and runs no block above them (the states are the same as a
    full runner's: below the top, a block's raw output; at the top, after the final norm)."""
    top = ArchSpec.from_config(policy.hf.config).n_layers
    if not layers or any(not 0 <= x <= top for x in layers):
        raise SaffronError(f"layers must be within 0..{top} (the policy's hidden states), got {list(layers)}")
    deepest = max(max(layers), 1)
    return Runner(policy, depth=deepest if deepest < top else None)


def save_head_mrm(path: Path, manifest: MrmManifest, net: HeadNet, unseen: torch.Tensor) -> None:
    """Write ``head.safetensors``, ``unseen_mask.pt`` and ``saffron.json``. Side effects: creates ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    atomic_write(path / "unseen_mask.pt", lambda tmp: torch.save(unseen.detach().cpu().clone(), tmp))
    write_manifest(path, manifest)


def inspect_head_files(path: Path, manifest: MrmManifest, kind: str, what: str,
                       weights: str = WEIGHTS) -> dict[str, Any]:
    """What every head's ``saffron mrm inspect`` shows, read from its ``weights`` file and the manifest alone
    (``what`` names the artifact in errors: "head MRM", "head PRM")."""
    try:
        state = load_file(str(path / weights))
    except FileNotFoundError:
        raise SaffronError(f"{what} file missing: {path / weights}") from None
    except Exception as e:
        raise SaffronError(f"{path / weights} is corrupted ({type(e).__name__})") from None
    return {
        "path": str(path),
        "kind": kind,
        "base_model": manifest.base_model,
        "layers": manifest.head.get("layers"),
        "width": int(state["inner.weight"].shape[0]),
        "features": int(state["mean"].shape[0]),
        "parameters": sum(int(v.numel()) for k, v in state.items() if k not in ("mean", "std")),
    }


def inspect_head_mrm(path: Path, manifest: MrmManifest) -> dict[str, Any]:
    """``saffron mrm inspect`` for a head MRM: its shapes and manifest, from its files alone."""
    info = inspect_head_files(path, manifest, "head", "head MRM")
    unseen = load_vector(path / "unseen_mask.pt")
    return {**info, "vocab_size": int(unseen.shape[0]), "unseen_tokens": int(unseen.bool().sum()),
            "flops_per_node": manifest.head.get("flops_per_node"), "manifest": asdict(manifest)}


__all__ = ["HeadMrm", "HeadNet", "ValueNet", "feature_runner", "inspect_head_mrm", "load_head_mrm", "save_head_mrm"]
