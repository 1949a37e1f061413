"""``saffron train-guard``: fit smol-guard's probe on the train split of the human-labelled responses.

Each labelled response is shown to the guard whole (up to ``MAX_RESPONSE_TOKENS``) and cut to its first
``PREFIX_TOKENS`` tokens, all with the response's label: a search scores partial responses, so the guard must
judge a harmful answer before it is finished. Features are the final-position hidden states of ``LAYERS``;
the probe is a regularised logistic regression (deterministic). Held-out rows are never read here.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from saffron.data import Example, guard_labelled
from saffron.embedded import EMBEDDED_POLICY
from saffron.errors import SaffronError
from saffron.guards.base import GuardPrompt
from saffron.guards.smol_guard import CLOSING, INSTRUCTIONS, Probe, ProbeSpec, chat_guard_prompt, save_probe
from saffron.model import Model, load_model
from saffron.runner import Runner

MAX_RESPONSE_TOKENS = 256
PREFIX_TOKENS = (8, 16, 32, 64)
LAYERS = (14, 18, 22)  # middle layers separate safe from unsafe best (layer sweep in docs/benchmarks.md)
HIDDEN = 0
EPOCHS = 300
LR = 1e-2
WEIGHT_DECAY = 1e-2
C = 0.01  # inverse L2 strength of the logistic probe


def response_views(model: Model, response: str, prefixes: Sequence[int]) -> list[list[int]]:
    """The response's token prefixes to show the guard, shortest first, ending with the (truncated) whole."""
    ids = model.encode(response)[:MAX_RESPONSE_TOKENS]
    views = [ids[:k] for k in sorted(prefixes) if 0 < k < len(ids)]
    return [*views, ids]


def guard_features(model: Model, prompt: GuardPrompt, rows: Sequence[Example], layers: Sequence[int],
                   prefixes: Sequence[int], progress: bool = True, desc: str = "features",
                   logit_pair: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Hidden states at the guard's answer position for every view of every row.

    Returns arrays over views: ``x`` (features [n, len(layers) * d]), ``unsafe`` (labels), ``row`` (row index),
    ``length`` (view length in tokens), and ``logit_diff`` (logit a - logit b, when ``logit_pair`` is given).
    All views of a row go to the runner as one batch: the head and the response run once, then one tail per
    view; the guard instructions shared by every row stay cached across rows.
    """
    runner = Runner(model, depth=None if logit_pair is not None else max(1, *layers))
    tail = model.encode(prompt.tail)
    feats: list[np.ndarray] = []
    labels: list[bool] = []
    rows_idx: list[int] = []
    lengths: list[int] = []
    diffs: list[float] = []
    for i, row in enumerate(tqdm(rows, desc=desc, unit="row", disable=not progress, dynamic_ncols=True)):
        if row.response is None or row.unsafe is None:
            raise SaffronError(f"row {row.id} has no labelled response")
        head = model.encode(prompt.bos + prompt.head.replace("{prompt}", row.prompt))
        views = response_views(model, row.response, prefixes)
        out = runner.forward([head + v + tail for v in views], logits=logit_pair is not None, hidden_layers=layers)
        assert out.hidden is not None
        feats.extend(out.hidden.flatten(1).numpy())
        labels.extend([row.unsafe] * len(views))
        rows_idx.extend([i] * len(views))
        lengths.extend(len(v) for v in views)
        if logit_pair is not None and out.logits is not None:
            diffs.extend((out.logits[:, logit_pair[0]] - out.logits[:, logit_pair[1]]).tolist())
    res = {"x": np.stack(feats), "unsafe": np.array(labels, dtype=bool), "row": np.array(rows_idx),
           "length": np.array(lengths)}
    if logit_pair is not None:
        res["logit_diff"] = np.array(diffs)
    return res


def fit_probe(x: np.ndarray, unsafe: np.ndarray, hidden: int, seed: int, epochs: int = EPOCHS, lr: float = LR,
              weight_decay: float = WEIGHT_DECAY, c: float = C) -> Probe:
    """Fit log-odds(safe) on standardised features, classes weighted to balance.

    Logistic (``hidden == 0``): L2-regularised logistic regression solved by L-BFGS (deterministic; strong
    regularisation ``c`` because 1.7k features meet a few thousand views). MLP: full-batch AdamW."""
    xt = torch.from_numpy(x).float()
    probe = Probe(x.shape[1], hidden)
    probe.mean.copy_(xt.mean(0))
    probe.std.copy_(xt.std(0).clamp_min(1e-4))
    safe = ~unsafe
    if hidden == 0:
        from sklearn.linear_model import LogisticRegression

        z = ((xt - probe.mean) / probe.std).double().numpy()
        lr_ = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(z, safe)
        assert isinstance(probe.net, torch.nn.Linear)
        with torch.no_grad():
            probe.net.weight.copy_(torch.from_numpy(lr_.coef_).float())
            probe.net.bias.copy_(torch.from_numpy(lr_.intercept_).float())
        return probe.eval()
    torch.manual_seed(seed)
    y = torch.from_numpy(safe).float()
    pos = float(y.mean())
    w = torch.where(y > 0, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(probe(xt), y, reduction="none") * w).mean()
        loss.backward()
        opt.step()
    return probe.eval()


def train_guard(out: Path, seed: int = 0, base_model: str = EMBEDDED_POLICY, layers: Sequence[int] = LAYERS,
                hidden: int = HIDDEN, prefixes: Sequence[int] = PREFIX_TOKENS, progress: bool = True,
                rows: Sequence[Example] | None = None) -> ProbeSpec:
    """Train and save a probe; return its spec (whose ``train`` field records how it was made).

    Side effects: writes ``out/probe.safetensors`` and ``out/probe.json``.
    """
    t0 = time.time()
    model = load_model(base_model)
    data = "guard-labelled:train" if rows is None else "custom"
    rows = guard_labelled("train") if rows is None else list(rows)
    if not rows:
        raise SaffronError("no labelled training rows")
    gp = chat_guard_prompt(model, INSTRUCTIONS, CLOSING)
    f = guard_features(model, gp, rows, layers, prefixes, progress, desc="train-guard features")
    x, unsafe = f["x"], f["unsafe"]
    t_feat = time.time() - t0
    probe = fit_probe(x, unsafe, hidden, seed)
    spec = ProbeSpec(base_model=base_model, layers=tuple(layers), hidden=hidden, train={
        "command": f"saffron train-guard --out {out} --seed {seed}",
        "seed": seed,
        "data": data,
        "n_rows": len(rows),
        "n_views": len(x),
        "unsafe_share": float(unsafe.mean()),
        "prefix_tokens": list(prefixes),
        "max_response_tokens": MAX_RESPONSE_TOKENS,
        "probe": "logistic (L-BFGS)" if hidden == 0 else f"mlp({hidden}) AdamW",
        "c": C, "epochs": EPOCHS, "lr": LR, "weight_decay": WEIGHT_DECAY,
        "feature_seconds": round(t_feat, 1),
        "total_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__, "python": platform.python_version(),
    })
    save_probe(out, spec, probe)
    return spec

