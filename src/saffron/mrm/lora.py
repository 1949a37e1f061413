"""The paper's MRM: a causal LM over the policy's tokenizer whose logits are rewards.

``M(s)[a]`` approximates ``R(s + a)``, the reward model's score of the response ``s`` extended by token ``a``, so
one call scores every child of a search node. As in Saffron-1: a backbone with LoRA adapters (default r=4,
alpha=4 on q_proj/v_proj) and a trainable bias on its frozen LM head. Tokens never seen as a next token in the
training corpus (the conservative-exploration mask) get ``penalty`` (default -1024): the model knows nothing
about them.

On disk, the released format plus a manifest:

    adapter_config.json, adapter_model.safetensors   the LoRA (peft)
    lm_head_bias.pt                                  [V] bias added to the LM head's output
    unseen_mask.pt                                   [V] bool, True = never seen as a next token
    saffron.json                                     base model, tokenizer fingerprint, input template, stats

The MRM reads ``bos + template(prompt) + response tokens`` (the attack prefill excluded), exactly what the
authors' code feeds it. Training: ``train/lora.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from saffron.errors import SaffronError
from saffron.model import Model, load_model_copy
from saffron.mrm.base import Mrm, MrmManifest, load_vector, read_manifest, tokenizer_fingerprint, write_manifest
from saffron.runner import Runner
from saffron.store import atomic_write_json


class LoraMrm(Mrm):
    """The paper's MRM: a LoRA-adapted copy of the base LM whose biased LM-head outputs are the rewards."""

    def __init__(self, model: Model, manifest: MrmManifest, bias: torch.Tensor, unseen: torch.Tensor) -> None:
        if bias.shape != (model.vocab_size,) or unseen.shape != (model.vocab_size,):
            raise SaffronError(f"MRM bias/mask have {bias.shape[0]}/{unseen.shape[0]} entries but the base model "
                               f"{manifest.base_model} has a vocabulary of {model.vocab_size}")
        self.model = model
        self.manifest = manifest
        self.bias = bias.to(model.device, next(model.hf.parameters()).dtype)
        self.unseen = unseen.to(model.device, torch.bool)
        lm_head = model.hf.get_output_embeddings()
        self.runner = Runner(model, head=lambda h: lm_head(h) + self.bias)

    def prompt_ids(self, prompt: str) -> list[int]:
        """What the MRM reads before the response: ``bos + template(prompt)``."""
        bos = self.model.tokenizer.bos_token or ""
        return self.model.encode(bos + self.manifest.template.format(prompt=prompt))

    def rewards(self, prompt: str, responses: Sequence[Sequence[int]], policy_hidden: torch.Tensor | None = None,
                raw: bool = False) -> torch.Tensor:
        ctx = self.prompt_ids(prompt)
        out = self.runner.forward([ctx + list(r) for r in responses]).logits
        assert out is not None
        return out if raw else out.masked_fill(self.unseen, self.manifest.penalty)


def add_lora(model: Model, r: int = 4, alpha: int = 4, targets: Sequence[str] = ("q_proj", "v_proj")) -> Any:
    """Inject fresh LoRA adapters into ``model`` in place (its modules now run base + adapter)."""
    from peft import LoraConfig, get_peft_model  # peft is slow to import and needed only here and in apply_mrm

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model.hf, cfg)


def save_mrm(path: Path, peft_model: Any, manifest: MrmManifest, bias: torch.Tensor, unseen: torch.Tensor) -> None:
    """Write the released format plus ``saffron.json``. Side effects: creates ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(path))
    # peft records the folder the base was loaded from (a cache path on this machine); name the base instead,
    # so the released files stay meaningful elsewhere
    cfg = json.loads((path / "adapter_config.json").read_text())
    atomic_write_json(path / "adapter_config.json", {**cfg, "base_model_name_or_path": manifest.base_model})
    torch.save(bias.detach().cpu().clone(), path / "lm_head_bias.pt")
    torch.save(unseen.detach().cpu().clone(), path / "unseen_mask.pt")
    write_manifest(path, manifest)


def adapter_config(path: Path) -> dict[str, Any]:
    p = path / "adapter_config.json"
    if not p.is_file():
        raise SaffronError(f"{path} is not an MRM folder (no adapter_config.json)")
    try:
        return dict(json.loads(p.read_text()))
    except ValueError:
        raise SaffronError(f"{p} is corrupted (not JSON)") from None


def load_lora_mrm(path: Path, manifest: MrmManifest | None, base_model: str | None = None,
                  device: str | None = None) -> LoraMrm:
    """Load a LoRA MRM folder (``manifest`` None: the authors' release) on a private copy of its base."""
    cfg = adapter_config(path)
    base = base_model or (manifest.base_model if manifest else cfg.get("base_model_name_or_path"))
    if not base:
        raise SaffronError(f"{path}: no base model recorded; pass the base model explicitly")
    return apply_mrm(load_model_copy(base, device), path)


def apply_mrm(model: Model, path: Path) -> LoraMrm:
    """Turn ``model`` (a private copy of the base) into the MRM stored at ``path``: inject its LoRA in place,
    read its bias and mask, and check the tokenizer it was trained with."""
    cfg = adapter_config(path)
    manifest = read_manifest(path)
    fingerprint = tokenizer_fingerprint(model.tokenizer)
    if manifest is None:  # the authors' release: no manifest, their input format
        manifest = MrmManifest(base_model=str(cfg.get("base_model_name_or_path") or model.name),
                               tokenizer_sha256=fingerprint, lora_r=int(cfg.get("r", 4)),
                               lora_alpha=int(cfg.get("lora_alpha", 4)),
                               target_modules=sorted(cfg.get("target_modules") or []))
    elif manifest.tokenizer_sha256 != fingerprint:
        raise SaffronError(f"{path} was trained on {manifest.base_model}, whose tokenizer differs from "
                           f"{model.name}'s")
    from peft import PeftModel  # see add_lora

    try:
        PeftModel.from_pretrained(model.hf, str(path), is_trainable=False)
    except Exception as e:
        raise SaffronError(f"cannot apply the LoRA adapter in {path} to {model.name} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]})") from None
    model.hf.eval()
    return LoraMrm(model, manifest, load_vector(path / "lm_head_bias.pt").float(),
                   load_vector(path / "unseen_mask.pt").bool())


def inspect_lora_mrm(path: Path, manifest: MrmManifest | None) -> dict[str, Any]:
    """``saffron mrm inspect`` for a LoRA MRM: its shapes and manifest, from its files alone (no base model)."""
    cfg = adapter_config(path)
    try:
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
            n_params = sum(int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in keys)
    except FileNotFoundError:
        raise SaffronError(f"MRM file missing: {path / 'adapter_model.safetensors'}") from None
    except Exception as e:
        raise SaffronError(f"{path / 'adapter_model.safetensors'} is corrupted ({type(e).__name__})") from None
    bias = load_vector(path / "lm_head_bias.pt")
    unseen = load_vector(path / "unseen_mask.pt")
    return {
        "path": str(path),
        "base_model": manifest.base_model if manifest else cfg.get("base_model_name_or_path"),
        "lora_r": int(cfg.get("r", 0)),
        "lora_alpha": int(cfg.get("lora_alpha", 0)),
        "target_modules": sorted(cfg.get("target_modules") or []),
        "adapter_tensors": len(keys),
        "adapter_parameters": n_params,
        "vocab_size": int(bias.shape[0]),
        "unseen_tokens": int(unseen.bool().sum()),
        "bias_dtype": str(bias.dtype).replace("torch.", ""),
        "bias_abs_max": float(bias.float().abs().max()),
        "bias_std": float(bias.float().std()),
        "manifest": asdict(manifest) if manifest else None,
    }
