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
(``kind: "head"``; ``head``: layers, width, policy fingerprint).
"""

from __future__ import annotations

import hashlib
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.flops import ArchSpec
from saffron.model import Model, load_model
from saffron.mrm.model import (
    MANIFEST,
    UNSEEN_PENALTY,
    Mrm,
    MrmManifest,
    _load_tensor,
    read_manifest,
    tokenizer_fingerprint,
)
from saffron.mrm.rewards import RewardRow
from saffron.runner import Runner
from saffron.store import atomic_write, atomic_write_json

WEIGHTS = "head.safetensors"
DEFAULT_LAYERS = (10, 14, 18, 22, 26, 30)
DEFAULT_WIDTH = 256


def _weight_tensors(model: Model) -> list[torch.Tensor]:
    hf = model.hf
    return [hf.get_input_embeddings().weight[::997], hf.model.norm.weight,
            hf.model.layers[-1].mlp.down_proj.weight[::97]]


FINGERPRINT_SAMPLE = 256  # weight values kept per manifest: enough to tell two checkpoints apart, small to store
# bf16 keeps 8 mantissa bits (relative error <= 2^-8), fp16 10 bits but flushes |x| < 6e-5 to subnormals: a value
# read in any of fp32/bf16/fp16 stays within this of its fp32 self, while another checkpoint's weights do not
FINGERPRINT_RTOL, FINGERPRINT_ATOL = 1e-2, 1e-4


def _tokenizer_shape_hash(model: Model) -> Any:
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
        return self.value(self.hidden(feats)).squeeze(-1)


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
        return self.value(z).squeeze(-1) + (self.token(z) * self.emb[tokens]).sum(-1) + self.bias[tokens]

    def over(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, len(tokens)]`` predicted rewards of the given tokens after each row."""
        z = self.hidden(feats)
        return self.value(z) + self.token(z) @ self.emb[tokens].T + self.bias[tokens]


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

    def share(self) -> HeadMrm:
        return HeadMrm(self.model, self.manifest, self.net, self.unseen)

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
    mrm = HeadMrm(policy, manifest, net, _load_tensor(path / "unseen_mask.pt").bool())
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


def row_features(runner: Runner, rows: Sequence[RewardRow], layers: tuple[int, ...], progress: bool
                 ) -> list[torch.Tensor]:
    """Per row ``[n + 1, L * d]``: the policy's states after ``chat(prompt) + response[:j]``, j = 0..n, read
    through the runner exactly as a search reads them (one forward per row; every prefix shares the cache)."""
    model = runner.model
    out = []
    for r in tqdm(rows, desc="policy states", unit="row", disable=not progress, dynamic_ncols=True):
        ctx = model.chat_prompt_ids(r.prompt)
        resp = list(r.response_ids)
        hidden = runner.forward([ctx + resp[:j] for j in range(len(resp) + 1)], logits=False,
                                hidden_layers=layers).hidden
        assert hidden is not None
        out.append(hidden.flatten(1).cpu())
        runner.reset()
    return out


@dataclass
class Features:
    """What a head trainer reads: the checked reward rows and the policy's states after each of their prefixes."""

    policy: Model
    data_manifest: dict[str, Any]
    rows: list[RewardRow]
    tokenizer_sha256: str
    layers: tuple[int, ...]
    states: list[torch.Tensor]  # per row [n + 1, L * d] (``row_features``)
    seconds: float
    flops: int


def check_fit_options(width: int, batch_size: int, epochs: int, lr: float, weight_decay: float) -> None:
    for name, v in (("width", width), ("batch_size", batch_size), ("epochs", epochs)):
        if v < 1:
            raise SaffronError(f"{name} must be >= 1, got {v}")
    if not lr > 0 or not weight_decay >= 0:
        raise SaffronError(f"lr must be > 0 and weight_decay >= 0, got {lr} and {weight_decay}")


def read_features(data_dir: Path, base_model: str, layers: Sequence[int], device: str | None, progress: bool
                  ) -> Features:
    """Check the reward folder (``training_data``: no held-out rows, the policy's tokenizer), load the policy
    and read its states at ``layers`` after every prefix of every row. Shared by the head MRM and the head PRM:
    the same rows and the same states, only the targets differ."""
    from saffron.mrm.train import training_data

    policy, data_manifest, rows, fingerprint = training_data(data_dir, base_model,
                                                             lambda: load_model(base_model, device))
    layers = tuple(int(x) for x in layers)
    runner = feature_runner(policy, layers)
    t0 = time.perf_counter()
    states = row_features(runner, rows, layers, progress)
    return Features(policy, data_manifest, rows, fingerprint, layers, states, time.perf_counter() - t0,
                    runner.flops)


def fit(net: ValueNet, x: torch.Tensor, y: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor],
        lr: float, weight_decay: float, batch_size: int, epochs: int, seed: int, progress: bool, what: str
        ) -> tuple[list[float], float]:
    """Fit ``net`` so that ``predict(idx)`` (the predictions for the supervised pairs ``idx``) meets ``y[idx]``:
    feature statistics from ``x``, the value bias at the mean target (rewards sit around -2, not 0), AdamW on
    seeded shuffles, mean squared error. Returns the per-epoch losses and the seconds it took."""
    with torch.no_grad():
        net.mean.copy_(x.mean(0))
        net.std.copy_(x.std(0).clamp_min(1e-4))
        net.value.bias.fill_(float(y.mean()))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in tqdm(range(epochs), desc=f"train {what}", unit="epoch", disable=not progress, dynamic_ncols=True):
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = ((predict(idx) - y[idx]) ** 2).mean()
            if not torch.isfinite(loss):
                raise SaffronError(f"{what} training diverged (loss {float(loss)}); lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
    if not math.isfinite(losses[-1]):
        raise SaffronError(f"{what} training ended with a non-finite loss")
    return losses, time.perf_counter() - t0


def train_record(feats: Features, losses: list[float], fit_seconds: float, t_start: float, command: str | None,
                 **options: Any) -> dict[str, Any]:
    """The ``train`` block of a head's manifest: its options, losses, timings and environment."""
    return {**options, "optimizer": f"AdamW(weight_decay={options.get('weight_decay')})", "loss_first": losses[0],
            "final_loss": losses[-1], "feature_seconds": round(feats.seconds, 3),
            "fit_seconds": round(fit_seconds, 3), "feature_flops": feats.flops,
            "seconds": round(time.time() - t_start, 3), "device": str(feats.policy.device),
            "command": command or " ".join(sys.argv), "torch": torch.__version__,
            "python": platform.python_version()}


def train_head_mrm(data_dir: str | Path, out: str | Path, base_model: str = EMBEDDED_POLICY,
                   layers: Sequence[int] = DEFAULT_LAYERS, width: int = DEFAULT_WIDTH, lr: float = 1e-3,
                   weight_decay: float = 0.1, batch_size: int = 256, epochs: int = 20, seed: int = 0,
                   eos: bool = True, penalty: float = UNSEEN_PENALTY, progress: bool = True,
                   device: str | None = None, command: str | None = None) -> MrmManifest:
    """Train a head MRM on the reward rows in ``data_dir`` and save it to ``out``.

    Supervision as for the LoRA MRM (``train.py``): the state after ``response[:j]`` predicts ``response[j]``'s
    reward, and on a complete row the state after the whole response predicts every EOS id with the final
    reward; ``eos=False`` (``--eos mask``) never supervises EOS, which then stays in the unseen mask (the paper's
    rule; recorded as ``eos_in_mask``). Reading the rows' policy states takes about two minutes on 2 CPU cores
    and fitting well under one, so a stopped run simply starts again (no checkpoint). Side effects: writes ``out``."""

    t_start = time.time()
    data_dir, out = Path(data_dir), Path(out)
    check_fit_options(width, batch_size, epochs, lr, weight_decay)
    feats = read_features(data_dir, base_model, layers, device, progress)
    policy, rows = feats.policy, feats.rows
    data_cfg = feats.data_manifest.get("config", {})
    eos_ids = sorted(policy.eos_ids)
    if eos and not eos_ids:
        raise SaffronError(f"{base_model} declares no EOS token; train with eos=False")

    parts: list[torch.Tensor] = []
    toks: list[int] = []
    want: list[float] = []
    masked = set() if eos else set(eos_ids)  # eos=False (--eos mask): EOS never a target, wherever it occurs
    for r, s in zip(rows, feats.states, strict=True):
        n = len(r.response_ids)
        keep = [j for j, t in enumerate(r.response_ids) if int(t) not in masked]
        parts.append(s[:n][keep])
        toks.extend(int(r.response_ids[j]) for j in keep)
        want.extend(float(r.rewards[j]) for j in keep)
        if eos and r.complete:
            for e in eos_ids:
                parts.append(s[n:])
                toks.append(e)
                want.append(float(r.rewards[-1]))
    x = torch.cat(parts).float()
    t = torch.tensor(toks, dtype=torch.long)
    y = torch.tensor(want, dtype=torch.float32)

    torch.manual_seed(seed)
    net = HeadNet(x.shape[1], width, policy.hf.get_output_embeddings().weight.detach().float().cpu())
    losses, fit_seconds = fit(net, x, y, lambda idx: net.at(x[idx], t[idx]), lr, weight_decay, batch_size, epochs,
                              seed, progress, "head mrm")

    seen = torch.zeros(policy.vocab_size, dtype=torch.bool)
    seen[t] = True
    unseen = ~seen
    manifest = MrmManifest(
        base_model=base_model, tokenizer_sha256=feats.tokenizer_sha256,
        reward_model=feats.data_manifest.get("reward_model"), penalty=penalty, lora_r=0, lora_alpha=0,
        target_modules=[], kind="head",
        head={"layers": list(feats.layers), "width": width, "policy_fingerprint": policy_fingerprint(policy),
              "flops_per_node": head_flops(x.shape[1], width, net.token.out_features, int(seen.sum()))},
        corpus={"data_dir": str(data_dir), "corpus": data_cfg.get("corpus"), "rows": len(rows),
                "tokens": sum(len(r.response_ids) for r in rows), "supervised_pairs": len(y),
                "max_tokens": data_cfg.get("max_tokens"), "seen_tokens": int(seen.sum()),
                "unseen_tokens": int(unseen.sum()), "eos_supervised": eos,
                "eos_in_mask": bool(unseen[eos_ids].all()) if eos_ids else None,
                "reward_mean": float(y.mean()), "reward_std": float(y.std()),
                "reward_model_identity": data_cfg.get("reward_model")},
        train=train_record(feats, losses, fit_seconds, t_start, command, epochs=epochs, lr=lr,
                           weight_decay=weight_decay, batch_size=batch_size, seed=seed),
    )
    save_head_mrm(out, manifest, net, unseen)
    return manifest


def save_head_mrm(path: Path, manifest: MrmManifest, net: HeadNet, unseen: torch.Tensor) -> None:
    """Write ``head.safetensors``, ``unseen_mask.pt`` and ``saffron.json``. Side effects: creates ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    atomic_write(path / "unseen_mask.pt", lambda tmp: torch.save(unseen.detach().cpu().clone(), tmp))
    atomic_write_json(path / MANIFEST, asdict(manifest))


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
    unseen = _load_tensor(path / "unseen_mask.pt")
    return {**info, "vocab_size": int(unseen.shape[0]), "unseen_tokens": int(unseen.bool().sum()),
            "flops_per_node": manifest.head.get("flops_per_node"), "manifest": asdict(manifest)}


__all__ = ["HeadMrm", "HeadNet", "inspect_head_mrm", "load_head_mrm", "policy_fingerprint", "same_policy",
           "train_head_mrm"]
