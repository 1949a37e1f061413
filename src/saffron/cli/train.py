"""Verbs that build training data and train models: ``saffron train-guard``, ``train-junk``,
``build-rewards`` and ``train-mrm``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from saffron.cli.common import int_list, place, quiet_hf
from saffron.cli.options import (
    DEVICE,
    DTYPE,
    POLICY,
    RUNNER,
    SEED,
)
from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.extras import require


def train_guard_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the weights and their JSON spec to."),
    seed: int = SEED,
    save_features: Path | None = typer.Option(None, "--save-features", help="Also write the training views' "
                                              "features to this .npz (to refit augmentation choices; probe)."),
    kind: str = typer.Option("probe", "--kind", help="probe: smol-guard's probe (guard half of the labels); "
                             "minilm: the independent minilm-judge (MiniLM encoder, judge half)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Train smol-guard's probe (with the robustness augmentations) or, --kind minilm, the independent judge, on
    the train split's labelled rows."""
    place(device, dtype, runner)
    quiet_hf()
    if kind == "minilm":
        if save_features is not None:
            raise SaffronError("--save-features applies to --kind probe only")
        from saffron.minilm_judge import train_minilm_judge

        typer.echo(json.dumps(train_minilm_judge(out, seed=seed).train, indent=2))
        return
    if kind != "probe":
        raise SaffronError(f"--kind must be probe or minilm, got {kind!r}")
    from saffron.guards.train import train_guard

    spec = train_guard(out, seed=seed, save_features=save_features)
    typer.echo(json.dumps(spec.train, indent=2))


def train_junk_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the junk detector to (junk.json, safetensors files)."),
    seed: int = SEED,
) -> None:
    """Train the junk detector of the quality columns on constructed junk vs the train split's responses."""
    from saffron.quality import train_junk_detector

    quiet_hf()
    typer.echo(json.dumps(train_junk_detector(out, seed=seed)["train"], indent=2))


def build_rewards_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for the Parquet shards and manifest.json (resumable)."),
    corpus: str = typer.Option("pyrit-harmful:train,guard-labelled:train,policy:pyrit-harmful:train", "--corpus",
                               help="Comma-separated sources: DATASET[:split], jsonl:PATH, policy:DATASET, hh-rlhf."),
    reward: str = typer.Option("smol-guard", "--reward", help="Reward model that scores every response prefix."),
    policy: str = POLICY,
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Response tokens annotated per row."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N rows per source."),
    allow_eval: bool = typer.Option(False, "--allow-eval", help="Admit dev and test prompts (benchmark sets "
                                    "only; train-mrm refuses such a folder)."),
    allow_heldout: bool = typer.Option(False, "--allow-heldout", hidden=True),
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Token-level safety rewards: the reward model's score of every response prefix (Safety4M recipe)."""
    require("pyarrow", "train", "saffron build-rewards")
    from saffron.mrm.data.build import build_rewards

    if allow_heldout:
        raise SaffronError("--allow-heldout is now --allow-eval: there is no 'heldout' split any more, the "
                           "evaluation splits are dev and test")
    place(device, dtype, runner)
    quiet_hf()
    m = build_rewards(out, corpus=corpus, reward=reward, policy=policy, max_tokens=max_tokens, limit=limit,
                      allow_eval=allow_eval, seed=seed)
    typer.echo(json.dumps({k: m[k] for k in ("rows", "tokens", "tokens_per_second") if k in m}, indent=2))


def train_mrm_cmd(
    data: Path = typer.Option(..., "--data", help="Reward folder written by build-rewards."),
    out: Path = typer.Option(..., "--out", help="MRM folder (weights, unseen_mask, saffron.json)."),
    kind: str = typer.Option("lora", "--kind", help="lora: the paper's MRM, a LoRA-adapted copy of the backbone; "
                             "head: a small network on the policy's own hidden states (the policy is the "
                             "backbone; a search pays only the head); prm: the same head as a value model, the "
                             "reward of the prefix itself, for the baselines (--reward head-prm:OUT)."),
    eos: str | None = typer.Option(None, "--eos", help="mask: EOS is never supervised and stays in the unseen "
                                   "mask (-1024 at inference, as the paper does; default for --kind lora, the "
                                   "paper's form); supervise: complete rows teach EOS the final reward, so a "
                                   "search can rank finished answers (default for --kind head)."),
    base_model: str = typer.Option(EMBEDDED_POLICY, "--base-model", help="Backbone (shares the policy's "
                                   "tokenizer); for --kind head and prm, the policy itself."),
    r: int | None = typer.Option(None, "--lora-r", min=1, help="LoRA rank (lora; default 4)."),
    alpha: int | None = typer.Option(None, "--lora-alpha", min=1, help="LoRA alpha (lora; default 4)."),
    layers: str | None = typer.Option(None, "--layers", help="Policy hidden states the head reads, comma-separated "
                                      "(head, prm; 0 = embeddings, N = final; default 10,14,18,22,26,30)."),
    width: int | None = typer.Option(None, "--width", min=1, help="Hidden units of the head (head, prm; default "
                                     "256)."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", min=0.0, help="AdamW weight decay (head, prm; "
                                              "default 0.1)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4 lora, 1e-3 head)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Sequences per step (lora, default "
                                          "4) or supervised tokens per step (head, prm: default 256)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Passes over the data (default 1 lora, "
                                      "20 head, prm)."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after N steps (resume later; "
                                         "lora)."),
    bias_init: str | None = typer.Option(None, "--bias-init", help="LM-head bias at step 0: mean (one offset "
                                         "fitted under the frozen backbone; default) or zero (the paper's) (lora)."),
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    runner: str = RUNNER,
) -> None:
    """Train an MRM with partial supervision; saves the conservative-exploration mask with it. Resumable (lora)."""
    require("pyarrow", "train", "saffron train-mrm")  # the reward folder is Parquet
    command = " ".join(["saffron", *sys.argv[1:]])
    if kind not in ("lora", "head", "prm"):
        raise SaffronError(f"--kind must be lora, head or prm, got {kind!r}")
    if eos not in (None, "mask", "supervise"):
        raise SaffronError(f"--eos must be mask or supervise, got {eos!r}")
    # an option the chosen kind has no use for is refused, not silently dropped
    other: dict[str, Any] = (
        {"--lora-r": r, "--lora-alpha": alpha, "--max-steps": max_steps, "--bias-init": bias_init}
        if kind in ("head", "prm") else {"--layers": layers, "--width": width, "--weight-decay": weight_decay})
    if kind == "prm":
        other["--eos"] = eos  # a value head scores prefixes, it predicts no next token
    stray = [flag for flag, v in other.items() if v is not None]
    if stray:
        raise SaffronError(f"{stray[0]} does not apply to --kind {kind}")
    supervise_eos = (eos or ("supervise" if kind == "head" else "mask")) == "supervise"
    place(device, dtype, runner)
    quiet_hf()
    if kind == "head":
        from saffron.mrm.head import DEFAULT_LAYERS, DEFAULT_WIDTH
        from saffron.mrm.train.head import train_head_mrm

        layer_ids = int_list("--layers", layers) if layers else DEFAULT_LAYERS
        man = train_head_mrm(data, out, base_model=base_model, layers=layer_ids, width=width or DEFAULT_WIDTH,
                             lr=lr if lr is not None else 1e-3,
                             weight_decay=weight_decay if weight_decay is not None else 0.1,
                             batch_size=batch_size or 256, epochs=epochs or 20, seed=seed, eos=supervise_eos,
                             command=command)
    elif kind == "prm":
        from saffron.mrm.head import DEFAULT_LAYERS, DEFAULT_WIDTH
        from saffron.mrm.train.head import train_head_prm

        layer_ids = int_list("--layers", layers) if layers else DEFAULT_LAYERS
        man = train_head_prm(data, out, base_model=base_model, layers=layer_ids, width=width or DEFAULT_WIDTH,
                             lr=lr if lr is not None else 1e-3,
                             weight_decay=weight_decay if weight_decay is not None else 0.1,
                             batch_size=batch_size or 256, epochs=epochs or 20, seed=seed, command=command)
    else:
        from saffron.mrm.train.lora import train_mrm

        man = train_mrm(data, out, base_model=base_model, r=r or 4, alpha=alpha or 4,
                        lr=lr if lr is not None else 1e-4, batch_size=batch_size or 4, epochs=epochs or 1,
                        max_steps=max_steps, seed=seed, bias_init=bias_init or "mean", eos=supervise_eos,
                        command=command)
    typer.echo(json.dumps(man.train or {}, indent=2))
