"""The head PRM: the head MRM's cheap value head, as a process reward model for the baselines.

Best-of-N, rejection sampling, Rebase and DeAL score whole (partial) outputs through the ``RewardModel``
interface, one reward-model call per candidate. The head PRM gives them the same cheap reward the head MRM gives
Saffron: a small network on the policy's own hidden states (``head.py``'s ``ValueNet``),

    f    = standardise(concat(policy hidden states at ``layers``, last position))
    R^(s) = v(gelu(W1 f))                            the teacher's reward of the prefix s

trained on the same reward corpus (``build-rewards``) as the head MRM: the state after ``response[:j]``
(j = 1..n) predicts ``rewards[j-1] = R(prompt, response[:j])``. The features, the data checks and the fitting
loop are the head MRM's (``train/head.py``: ``read_features`` / ``fit``); only the target differs (the
prefix's own reward instead of each next token's).

What it reads. Called by a method (``score_outputs``), it reads exactly what the search's policy read:
``chat(prompt) + prefill + output`` as token ids, so it sees the attack prefill as the head MRM does inside
Saffron (the corpus stores no prefill, so a prefilled context is one it was not trained on, for both heads
alike). Called with text (``score``: Saffron's final rerank, benchmarks), it reads ``chat(prompt) +
encode(response)``, with no prefill.

Cost, counted honestly. The PRM runs the policy's forward through its OWN runner (``flops`` = that runner's
FLOPs + ``flops_per_call`` per scored output, ``2 (F w + w)``). Nothing is shared with the policy's runner: the
baselines' interface hands a reward model token ids, not the policy's states, so every policy token a baseline
scores is computed a second time here, up to the deepest layer the head reads (blocks above it never run; no LM
head). What is shared is the PRM's own radix cache across the calls of one prompt: the chat prompt and prefill
are computed once, and a candidate extending one scored before (Rebase's children, DeAL's tree) pays only its
new tokens. The chat template's fixed system text is kept across prompts (``setup_flops``), as the guards keep
their instructions. Reading the states from the policy's own forward, as Saffron's head MRM does, would make a
call cost only the head; the baselines do not do that here.

It reads exactly one policy: the one it was trained on (the head MRM's weight fingerprint); a method handing it
another policy is refused. On disk: ``prm.safetensors``, ``saffron.json`` (``kind: "prm"``; ``head``: layers,
width, policy fingerprint, flops_per_call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saffron.errors import SaffronError
from saffron.guards.base import RewardModel
from saffron.model import Model, load_model
from saffron.mrm.base import MANIFEST, MrmManifest, read_manifest, same_policy, write_manifest
from saffron.mrm.head import ValueNet, feature_runner, inspect_head_files
from saffron.session import Session
from saffron.store import atomic_write

KIND = "prm"
NAME = "head-prm"
WEIGHTS = "prm.safetensors"
ASSET = Path(__file__).resolve().parent.parent / "assets" / "smol_prm_head"
# The shipped head PRM is trained on the shipped head MRM's corpus, with the head MRM's defaults.
BUILD = ("saffron build-rewards --out runs/rewards --max-tokens 48 --limit 128 --seed 0 && saffron train-mrm "
         "--kind prm --data runs/rewards --out {path} --seed 0")


def prm_flops(n_features: int, width: int) -> int:
    """One scored output's head FLOPs: the inner layer and the value (the GELU and additions are negligible)."""
    return 2 * (n_features * width + width)


class HeadPrm(RewardModel):
    """A head PRM bound to its policy (see the module docstring)."""

    def __init__(self, policy: Model, manifest: MrmManifest, net: ValueNet, name: str = NAME) -> None:
        self.name = name
        self.model = policy
        self.manifest = manifest
        self.net = net.to(policy.device).eval()
        self.layers = tuple(int(x) for x in manifest.head["layers"])
        self.runner = feature_runner(policy, self.layers)
        self.head_flops = 0
        self.flops_per_call = prm_flops(net.inner.in_features, net.inner.out_features)
        self._checked: dict[int, Model] = {}  # policies already checked (by identity; kept alive to pin the id)
        self.keep_fixed_prefix()

    @property
    def flops(self) -> int:
        return self.runner.flops + self.head_flops

    def check_policy(self, policy: Model) -> None:
        """Refuse a policy other than the one this PRM read in training (its states would mean nothing)."""
        if id(policy) in self._checked:
            return
        if policy is not self.model and not same_policy(policy, self.manifest.head.get("policy_fingerprint")):
            raise SaffronError(f"the head PRM reads the hidden states of {self.manifest.base_model}, and the policy "
                               f"{policy.name} is another model; pass --reward head-prm:PATH with a PRM trained "
                               f"for it (`saffron train-mrm --kind prm --base-model {policy.name}`)")
        self._checked[id(policy)] = policy

    def guard_ids(self, prompt: str, response: str) -> list[int]:
        return self.model.chat_prompt_ids(prompt) + self.model.encode(response)

    @torch.inference_mode()
    def readout(self, prompt_ids_batch: list[list[int]]) -> torch.Tensor:
        hidden = self.runner.forward(prompt_ids_batch, logits=False, hidden_layers=self.layers).hidden
        assert hidden is not None
        self.head_flops += self.flops_per_call * len(prompt_ids_batch)
        out: torch.Tensor = self.net(hidden.flatten(1).float())  # a Module's __call__ is typed Any
        return out

    def score_outputs(self, session: Session, policy: Model, outputs: Sequence[Sequence[int]]) -> list[float]:
        """The exact token ids the search's policy read: ``chat(prompt) + prefill + output``."""
        self.check_policy(policy)
        if not outputs:
            return []
        ctx = list(session.context_ids)
        return [float(x) for x in self.readout([ctx + list(o) for o in outputs])]


def load_head_prm(path: str | Path | None = None, device: str | None = None) -> HeadPrm:
    """A head PRM folder, or the embedded one (``path`` None)."""
    folder = Path(path) if path else ASSET
    manifest = read_manifest(folder)
    if manifest is None:
        if path is None:
            raise SaffronError(f"the embedded head PRM is missing from {folder}; build it with "
                               f"`{BUILD.format(path=folder)}`")
        raise SaffronError(f"{folder} is not a head PRM folder (no {MANIFEST}); train one with `saffron train-mrm "
                           f"--kind prm --data REWARDS --out {folder}`")
    if manifest.kind != KIND:
        raise SaffronError(f"{folder} holds a {manifest.kind} MRM, not a head PRM: pass it as --mrm, or train a "
                           f"PRM with `saffron train-mrm --kind prm`")
    policy = load_model(manifest.base_model, device)
    try:
        state = load_file(str(folder / WEIGHTS))
        net = ValueNet(int(state["mean"].shape[0]), int(state["inner.weight"].shape[0]))
        net.load_state_dict(state)
    except FileNotFoundError:
        raise SaffronError(f"head PRM file missing: {folder / WEIGHTS}") from None
    except Exception as e:
        raise SaffronError(f"head PRM in {folder} is corrupted ({type(e).__name__}); retrain it with `saffron "
                           f"train-mrm --kind prm`") from None
    prm = HeadPrm(policy, manifest, net)
    if not same_policy(policy, manifest.head.get("policy_fingerprint")):
        raise SaffronError(f"the head PRM in {folder} was trained on other weights than {manifest.base_model}'s "
                           f"as loaded here; retrain it with `saffron train-mrm --kind prm`")
    return prm


def save_head_prm(path: Path, manifest: MrmManifest, net: ValueNet) -> None:
    """Write ``prm.safetensors`` and ``saffron.json``. Side effects: creates ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    write_manifest(path, manifest)


def inspect_head_prm(path: Path, manifest: MrmManifest) -> dict[str, Any]:
    """``saffron mrm inspect`` for a head PRM: its shapes and manifest, from its files alone."""
    return {**inspect_head_files(path, manifest, KIND, "head PRM", WEIGHTS),
            "flops_per_call": manifest.head.get("flops_per_call"), "usage": f"--reward head-prm:{path}",
            "manifest": asdict(manifest)}


__all__ = ["HeadPrm", "inspect_head_prm", "load_head_prm", "prm_flops", "save_head_prm"]
