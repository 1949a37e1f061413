"""``saffron bench mrm``: how well an MRM predicts the reward model on held-out prefixes, and what it saves.

Held-out set: a reward folder built by ``build_heldout_rewards`` (``build_rewards(..., allow_eval=True)`` on
``pyrit-harmful:dev,guard-labelled:dev``, a few rows each; ``train_mrm`` refuses such a folder). Choosing an MRM is
a choice, so it is made on ``dev``, never on ``test``. For every held-out row and every position j, the MRM's
prediction ``M(s[:j])[s_j]`` is compared with the reward model's ``R(s[:j+1])``. The headline figures (pearson,
spearman, mae, rmse, sign agreement) are over targets the MRM saw in training (an unseen target is masked to the
penalty at search time, so its raw output means nothing); the same figures over all targets, raw, are reported with
an ``all_`` prefix, with the share of unseen targets.

Baselines: ``const_mae`` predicts the held-out mean reward (an MRM must beat it); ``parent_*`` predicts each
prefix's reward by its parent's, ``R(s[:j])`` (a search that knew the current reward but not the next token's
effect; j >= 1 only).

Savings: one MRM call scores every child of a node. ``rm_calls_replaced_per_step`` is the mean size of the
policy's top-p (0.8) nucleus over the held-out nodes: the reward-model calls a search would need per node to
score the same candidates. ``rm_calls_replaced_vocab`` is the whole vocabulary (every child),
``mrm_seen_tokens`` the children the MRM gives a non-penalty reward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from saffron.data import DEV_SPLIT, split_of
from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.model import load_model
from saffron.mrm.model import Mrm, load_mrm, tokenizer_fingerprint
from saffron.mrm.rewards import DEFAULT_MAX_TOKENS, DEFAULT_REWARD, RewardRow, build_rewards, read_rewards

HELDOUT_CORPUS = f"pyrit-harmful:{DEV_SPLIT},guard-labelled:{DEV_SPLIT}"
DEFAULT_TOP_P = 0.8


def build_heldout_rewards(out: str | Path, reward: str = DEFAULT_REWARD, policy: str = EMBEDDED_POLICY,
                          corpus: str = HELDOUT_CORPUS, limit: int | None = 32,
                          max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Build the held-out reward set ``bench_mrm`` reads (``limit`` rows per source, from the dev split). Never
    train on it: its manifest records allow_eval=True and ``train_mrm`` refuses it.

    Usage: ``build_heldout_rewards("data/rewards-dev", limit=32)``."""
    return build_rewards(out, corpus=corpus, reward=reward, policy=policy, max_tokens=max_tokens, limit=limit,
                         allow_eval=True, progress=progress)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    from scipy.stats import spearmanr

    v = spearmanr(x, y).statistic
    return None if v is None or not np.isfinite(v) else float(v)


def _metrics(pred: np.ndarray, want: np.ndarray, prefix: str = "") -> dict[str, Any]:
    if len(pred) == 0:
        return {f"{prefix}{k}": None for k in ("pearson", "spearman", "mae", "rmse", "sign_agreement")}
    return {
        f"{prefix}pearson": _pearson(pred, want),
        f"{prefix}spearman": _spearman(pred, want),
        f"{prefix}mae": float(np.abs(pred - want).mean()),
        f"{prefix}rmse": float(np.sqrt(((pred - want) ** 2).mean())),
        f"{prefix}sign_agreement": float(((pred > 0) == (want > 0)).mean()),
    }


def bench_mrm(mrm: str | Path | Mrm, data: str | Path | Sequence[RewardRow], policy: str | None = None,
              top_p: float = DEFAULT_TOP_P, limit: int | None = None, split: str | None = DEV_SPLIT,
              base_model: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Compare an MRM (folder or loaded) with the reward model on held-out reward rows (folder or rows).

    Usage: ``bench_mrm("models/mrm", "data/rewards-dev")``. ``policy`` (default: the one the data was
    tokenised for, else the MRM's base) gives the nucleus sizes; ``split`` keeps only rows whose prompt is in
    that split (default dev; None keeps all); ``limit`` caps the rows read. Returns a JSON-able dict."""
    t0 = time.time()
    model = mrm if isinstance(mrm, Mrm) else load_mrm(mrm, base_model)
    info: dict[str, Any] = {}
    if isinstance(data, (str, Path)):
        manifest, rows = read_rewards(data)
        cfg = manifest.get("config", {})
        if cfg.get("policy_tokenizer_sha256") != model.manifest.tokenizer_sha256:
            raise SaffronError(f"{data} was tokenised for {cfg.get('policy')}, whose tokenizer differs from the "
                               f"MRM's ({model.manifest.base_model})")
        info["data"] = str(data)
        info["data_reward_model"] = manifest.get("reward_model")
        info["reward_model_match"] = (model.manifest.reward_model is None
                                      or model.manifest.reward_model == manifest.get("reward_model"))
        policy = policy or cfg.get("policy")
    else:
        rows = list(data)
    n_read = len(rows)
    if split is not None:
        rows = [r for r in rows if split_of(r.prompt) == split]
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise SaffronError(f"no {split or 'held-out'} reward rows to benchmark on ({n_read} read); build them with "
                           f"build_heldout_rewards / `saffron build-rewards --allow-eval --corpus "
                           f"{HELDOUT_CORPUS}`")
    pol = load_model(policy or model.manifest.base_model)
    if tokenizer_fingerprint(pol.tokenizer) != model.manifest.tokenizer_sha256:
        raise SaffronError(f"policy {pol.name} does not share the MRM's tokenizer")
    from saffron.methods.sampling import nucleus_mask
    from saffron.runner import Runner

    pol_runner = Runner(pol)
    preds, wants, seen_t, parents, nucleus = [], [], [], [], []
    f0 = model.flops
    for r in tqdm(rows, desc="bench mrm", unit="row", disable=not progress, dynamic_ncols=True):
        resp = list(r.response_ids)
        out = model.rewards(r.prompt, [resp[:j] for j in range(len(resp))], raw=True)
        tok = torch.tensor(resp, device=out.device)
        preds.append(out[torch.arange(len(resp), device=out.device), tok].float().cpu().numpy())
        seen_t.append((~model.unseen[tok]).cpu().numpy())
        want = np.asarray(r.rewards, dtype=np.float64)
        wants.append(want)
        parents.append(np.r_[np.nan, want[:-1]])
        model.runner.reset()
        ctx = pol.chat_prompt_ids(r.prompt)
        lg = pol_runner.forward([ctx + resp[:j] for j in range(len(resp))]).logits
        assert lg is not None
        nucleus.append(nucleus_mask(lg, top_p).sum(-1).cpu().numpy())
        pol_runner.reset()
    pred = np.concatenate(preds).astype(np.float64)
    want = np.concatenate(wants)
    seen = np.concatenate(seen_t).astype(bool)
    parent = np.concatenate(parents)
    nuc = np.concatenate(nucleus)
    has_parent = ~np.isnan(parent)
    vocab = int(model.unseen.shape[0])
    res: dict[str, Any] = {
        "split": split,
        "n_heldout_rows": len(rows),
        "n_heldout_tokens": len(want),
        "n_seen_targets": int(seen.sum()),
        "unseen_target_share": float(1 - seen.mean()),
        **_metrics(pred[seen], want[seen]),
        **_metrics(pred, want, "all_"),
        "const_mae": float(np.abs(want - want.mean()).mean()),
        "parent_mae": float(np.abs(parent[has_parent] - want[has_parent]).mean()) if has_parent.any() else None,
        "parent_pearson": _pearson(parent[has_parent], want[has_parent]),
        "reward_mean": float(want.mean()),
        "reward_std": float(want.std()),
        "unsafe_target_share": float((want < 0).mean()),
        "rm_calls_replaced_per_step": float(nuc.mean()),
        "nucleus_top_p": top_p,
        "nucleus_median": float(np.median(nuc)),
        "rm_calls_replaced_vocab": vocab,
        "mrm_seen_tokens": int(vocab - int(model.unseen.sum())),
        "mrm_flops_per_node": (model.flops - f0) / len(want),
        # in a search a head MRM reads the policy's states from the policy's own forward: only its head runs
        "mrm_search_flops_per_node": getattr(model, "flops_per_node", (model.flops - f0) / len(want)),
        "mrm_kind": model.manifest.kind,
        "mrm": model.manifest.base_model,
        "mrm_reward_model": model.manifest.reward_model,
        "policy": pol.name,
        "seconds": round(time.time() - t0, 2),
        **info,
    }
    return res
