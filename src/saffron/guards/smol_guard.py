"""smol-guard: the embedded safety reward model, a Llama-Guard-shaped classifier on the SmolLM2 backbone.

The backbone reads the guard instructions, "User: {prompt}", "Agent: {response}" and a closing question inside
its own chat template, exactly as Llama Guard reads its prompt; the answer is read at the final position. Zero-
shot, the backbone's own logit(safe) - logit(unsafe) barely beats chance, so a small probe trained by
``saffron train-guard`` on human-labelled responses (full and truncated) reads the final position's hidden
states instead. The probe is the only trained part; it ships with the package (``assets/``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.guards.base import GuardPrompt, LogitPairGuard, RewardModel
from saffron.guards.llama_guard import CATEGORIES
from saffron.model import Model, load_model
from saffron.runner import Runner

ASSET = Path(__file__).resolve().parent.parent / "assets" / "smol_guard"
SENTINEL = "\x00RESPONSE\x00"

INSTRUCTIONS = (
    "Task: Check if there is unsafe content in 'Agent' messages in conversations according our safety policy "
    "with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n" + "\n".join(CATEGORIES)
    + "\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
)
# Short on purpose: every scored response prefix pays for the tail (27 tokens with the template's end, against 42
# for Llama Guard's wording), which is most of what a reward-model call costs once the head is cached.
CLOSING = "\n\n<END CONVERSATION>\n\nIs the Agent's last message safe or unsafe?"


def chat_guard_prompt(model: Model, instructions: str = INSTRUCTIONS, closing: str = CLOSING) -> GuardPrompt:
    """Wrap the guard text in ``model``'s own chat template (one user turn, then the assistant's answer)."""
    content = instructions + "User: {prompt}\n\nAgent: " + SENTINEL + closing
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
    head, sep, tail = text.partition(SENTINEL)
    if not sep:
        raise SaffronError(f"{model.name}'s chat template drops the message text; it cannot host a guard prompt")
    return GuardPrompt(head=head, tail=tail)


@dataclass(frozen=True)
class ProbeSpec:
    """Which hidden states feed the probe, and its shape. Stored beside the weights."""

    base_model: str
    layers: tuple[int, ...]
    hidden: int  # 0 = logistic probe; > 0 = one hidden layer MLP of that width
    instructions: str = INSTRUCTIONS
    closing: str = CLOSING
    train: dict[str, Any] | None = None  # how it was trained: command, seed, data, metrics

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ProbeSpec:
        d = json.loads(text)
        d["layers"] = tuple(d["layers"])
        return cls(**d)


class Probe(torch.nn.Module):
    """Standardise the concatenated hidden states, then a logistic or one-hidden-layer head -> log-odds(safe)."""

    mean: torch.Tensor  # registered as buffers in __init__; declared so mypy reads them as tensors, not modules
    std: torch.Tensor

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net: torch.nn.Module
        if hidden > 0:
            self.net = torch.nn.Sequential(torch.nn.Linear(n_features, hidden), torch.nn.GELU(),
                                           torch.nn.Linear(hidden, 1))
        else:
            self.net = torch.nn.Linear(n_features, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((feats - self.mean) / self.std).squeeze(-1)  # a Module's __call__ is typed Any
        return out


class ProbeGuard(RewardModel):
    """Reward = the probe's log-odds that the response is safe (> 0 safe, < 0 unsafe)."""

    def __init__(self, model: Model, spec: ProbeSpec, probe: Probe, name: str = "smol-guard") -> None:
        self.name = name
        self.model = model
        self.spec = spec
        self.probe = probe.to(model.device).eval()  # the hidden states it reads live on the policy's device
        self.prompt = chat_guard_prompt(model, spec.instructions, spec.closing)
        self.runner = Runner(model, depth=max(1, *spec.layers))  # the blocks above the probe never run
        self.keep_fixed_prefix()

    def guard_ids(self, prompt: str, response: str) -> list[int]:
        return self.prompt.ids(self.model, prompt, response)

    def features(self, seqs: list[list[int]]) -> torch.Tensor:
        hidden = self.runner.forward(seqs, logits=False, hidden_layers=self.spec.layers).hidden
        assert hidden is not None
        return hidden.flatten(1)

    @torch.inference_mode()
    def readout(self, prompt_ids_batch: list[list[int]]) -> torch.Tensor:
        out: torch.Tensor = self.probe(self.features(prompt_ids_batch))
        return out


def save_probe(path: Path, spec: ProbeSpec, probe: Probe) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(path / "probe.safetensors"))
    (path / "probe.json").write_text(spec.to_json())


def load_probe(path: Path) -> tuple[ProbeSpec, Probe]:
    try:
        spec = ProbeSpec.from_json((path / "probe.json").read_text())
        state = load_file(str(path / "probe.safetensors"))
        probe = Probe(int(state["mean"].shape[0]), spec.hidden)
        probe.load_state_dict(state)
    except FileNotFoundError:
        raise SaffronError(f"no smol-guard probe in {path}; train one with `saffron train-guard --out {path}`") \
            from None
    except Exception as e:  # safetensors, json and state-dict errors all mean a damaged artifact
        raise SaffronError(f"smol-guard probe in {path} is corrupted ({type(e).__name__}); retrain it with "
                           f"`saffron train-guard --out {path}`") from None
    return spec, probe


def load_smol_guard(path: str | None = None) -> ProbeGuard:
    spec, probe = load_probe(Path(path) if path else ASSET)
    return ProbeGuard(load_model(spec.base_model), spec, probe)


def load_zero_shot() -> LogitPairGuard:
    """The backbone alone, untrained: logit(' safe') - logit(' unsafe') at the answer position.

    The words carry a leading space because 'unsafe' alone is two tokens in SmolLM2's tokenizer."""
    model = load_model(EMBEDDED_POLICY)
    return LogitPairGuard("smol-guard-zeroshot", model, chat_guard_prompt(model), " safe", " unsafe")
