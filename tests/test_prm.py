"""The head PRM (mrm/prm.py): trained on a toy reward corpus with the tiny Llama, used by Best-of-N through the
guard registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyarrow", reason="reward folders are Parquet: pip install 'saffron[train]'")

import torch
from safetensors.torch import load_file

from saffron.data import Example
from saffron.errors import SaffronError
from saffron.guards.base import RewardModel
from saffron.guards.registry import check_guard_spec, load_guard
from saffron.methods.base import Stack
from saffron.methods.best_of_n import BestOfN
from saffron.methods.rebase import Rebase
from saffron.model import Model, load_model
from saffron.mrm.base import Mrm
from saffron.mrm.data.store import read_rewards
from saffron.mrm.prm import HeadPrm, load_head_prm, prm_flops
from saffron.mrm.registry import inspect_mrm, load_mrm
from saffron.mrm.train.head import train_head_prm
from saffron.runner import Runner
from saffron.session import Session
from tests.test_mrm_train import _hand_made, _prompts, _row

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPTS: dict[str, Any] = {"layers": (1, 2), "width": 16, "lr": 1e-2, "epochs": 40, "batch_size": 16, "progress": False,
        "device": "cpu"}


@pytest.fixture(scope="module")
def prm_data(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A prefix's reward is +2 if its last token is even, -2 if odd (12 rows, 8 tokens each): learnable from the
    state after the prefix, so a value head must fit it."""
    model = load_model(str(tiny_dir))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i, p in enumerate(_prompts(12, "train", tag="prm")):
        ids = torch.randint(10, 30, (8,), generator=gen).tolist()
        rows.append(_row(model, i, p, ids, i % 2 == 0, [2.0 if t % 2 == 0 else -2.0 for t in ids]))
    return _hand_made(tmp_path_factory.mktemp("prm-data") / "d", model, rows)


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, prm_data: Path) -> Path:
    out = tmp_path_factory.mktemp("prm") / "prm"
    train_head_prm(prm_data, out, base_model=str(tiny_dir), **OPTS)
    return out


def _session(model: str | Model, prompt: str, prefill: str = "") -> Session:
    m = load_model(model) if isinstance(model, str) else model
    return Session(prompt=prompt, prompt_ids=tuple(m.chat_prompt_ids(prompt)),
                   prefill_ids=tuple(m.encode(prefill)) if prefill else ())


def test_head_prm_fits_its_corpus(tiny_dir: Path, prm_data: Path, prm_dir: Path) -> None:
    prm = load_guard(f"head-prm:{prm_dir}")
    assert isinstance(prm, HeadPrm) and prm.manifest.kind == "prm" and prm.layers == (1, 2)
    assert prm.manifest.train["final_loss"] < 0.2 * prm.manifest.train["loss_first"]
    policy = load_model(str(tiny_dir))
    _, rows = read_rewards(prm_data)
    pred, want = [], []
    for r in rows:  # every prefix s[:j], j >= 1, read as the search reads it (no prefill here)
        pred += prm.score_outputs(_session(policy, r.prompt), policy,
                                  [r.response_ids[:j] for j in range(1, len(r.response_ids) + 1)])
        want += list(r.rewards)
    p, w = torch.tensor(pred), torch.tensor(want)
    assert float(((p - w) ** 2).mean()) < 0.1 * float(((w - w.mean()) ** 2).mean())
    # text in, the same ids out: ``score`` on the decoded prefix agrees with the ids (byte tokenizer round-trips)
    r = rows[0]
    text = policy.decode(r.response_ids[:4])
    assert prm.score(r.prompt, [text])[0] == pytest.approx(pred[3], abs=1e-5)
    info = inspect_mrm(prm_dir)
    assert info["kind"] == "prm" and info["width"] == 16 and info["flops_per_call"] == prm.flops_per_call
    with pytest.raises(SaffronError, match=r"is a head PRM .* --reward head-prm:"):
        load_mrm(prm_dir)


def test_head_prm_training_is_deterministic(tmp_path: Path, tiny_dir: Path, prm_data: Path, prm_dir: Path) -> None:
    train_head_prm(prm_data, tmp_path / "again", base_model=str(tiny_dir), **OPTS)
    a, b = load_file(str(prm_dir / "prm.safetensors")), load_file(str(tmp_path / "again" / "prm.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train_head_prm(prm_data, tmp_path / "seed1", base_model=str(tiny_dir), **{**OPTS, "seed": 1})
    c = load_file(str(tmp_path / "seed1" / "prm.safetensors"))
    assert not torch.equal(a["inner.weight"], c["inner.weight"])


def test_head_prm_flops_are_its_own_forward_plus_the_head(tiny_dir: Path, prm_dir: Path) -> None:
    prm = load_head_prm(prm_dir)
    policy = load_model(str(tiny_dir))
    d = policy.hf.config.hidden_size
    assert prm.flops_per_call == prm_flops(2 * d, 16) == 2 * (2 * d * 16 + 16)
    prm.reset()
    session = _session(policy, "how do I do it?", prefill="Sure")
    outs = [list(policy.encode("ab")), list(policy.encode("cd"))]
    f0, r0, t0 = prm.flops, prm.runner.flops, prm.runner.stats.computed_tokens
    first = prm.score_outputs(session, policy, outs)
    assert prm.flops - f0 == (prm.runner.flops - r0) + 2 * prm.flops_per_call
    # chat prompt (past the kept system text) + prefill once, then each output's own tokens
    kept = len(prm.fixed_prefix())
    assert prm.runner.stats.computed_tokens - t0 == len(session.context_ids) - kept + 4
    # children of scored outputs pay only their new token in the PRM's radix cache
    t1 = prm.runner.stats.computed_tokens
    prm.score_outputs(session, policy, [o + [40] for o in outs])
    assert prm.runner.stats.computed_tokens - t1 == 2
    # the prefill is read: the same outputs without it score otherwise
    assert prm.score_outputs(_session(policy, "how do I do it?"), policy, outs) != first


def test_head_prm_refuses_another_policy(tmp_path: Path, tiny_dir: Path, prm_dir: Path) -> None:
    from tests.conftest import make_tiny_llama

    other = load_model(str(make_tiny_llama(tmp_path / "other", seed=1)))  # same tokenizer, other weights
    prm = load_head_prm(prm_dir)
    with pytest.raises(SaffronError, match=r"reads the hidden states of .* another model; pass --reward head-prm"):
        BestOfN(n=2, max_new_tokens=3).search(_session(other, "hi there"), Stack(policy=Runner(other), reward=prm), 0)


def test_head_prm_through_the_registry_guides_best_of_n_and_rebase(tmp_path: Path, tiny_dir: Path,
                                                                   prm_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    check_guard_spec(f"head-prm:{prm_dir}")
    with pytest.raises(SaffronError, match="is not a folder"):
        check_guard_spec(f"head-prm:{tmp_path / 'nothing'}")
    monkeypatch.setattr("saffron.mrm.prm.ASSET", tmp_path / "missing")
    with pytest.raises(SaffronError, match=r"embedded head PRM is missing.*train-mrm --kind prm"):
        load_guard("head-prm")
    policy = load_model(str(tiny_dir))
    prm = load_guard(f"head-prm:{prm_dir}")
    session = _session(policy, "how do I do it?", prefill="Sure")
    runs = []
    for _ in range(2):
        prm.reset()
        res = BestOfN(n=4, max_new_tokens=5).search(session, Stack(policy=Runner(policy), reward=prm), 7)
        runs.append(res)
    a, b = runs
    assert a.output_ids == b.output_ids and a.trace == b.trace and a.flops == b.flops  # deterministic
    assert a.flops["reward"] > 0 and a.trace["rewards"][a.trace["chosen"]] == max(a.trace["rewards"])
    res = Rebase(width=2, children=2, max_new_tokens=4).search(session, Stack(policy=Runner(policy), reward=prm), 0)
    assert len(res.output_ids) <= 4 and res.flops["reward"] > 0


def test_train_mrm_cli_trains_a_prm(tmp_path: Path, tiny_dir: Path, prm_data: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from saffron.cli import main

    out = tmp_path / "cli-prm"
    main(["train-mrm", "--kind", "prm", "--data", str(prm_data), "--out", str(out), "--base-model", str(tiny_dir),
          "--layers", "1,2", "--width", "8", "--epochs", "2"])
    assert isinstance(load_guard(f"head-prm:{out}"), HeadPrm)
    with pytest.raises(SystemExit) as e:
        main(["train-mrm", "--kind", "value", "--data", str(prm_data), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--kind must be lora, head or prm" in capsys.readouterr().err


# --- sibling ranking (bench/mrm.py) ------------------------------------------------------------------------------


class OracleMrm(Mrm):
    """An MRM that knows the reward model exactly (``sign`` -1: exactly backwards): every child of every node
    scored by the reward model itself."""

    def __init__(self, reward: RewardModel, policy: Model, sign: float) -> None:
        from saffron.mrm.data.annotate import Annotator

        self.ann = Annotator(reward, policy)
        self.model, self.sign = policy, sign
        self.runner = Runner(policy)
        self.unseen = torch.zeros(policy.vocab_size, dtype=torch.bool)

    def rewards(self, prompt: str, responses: Sequence[Sequence[int]], policy_hidden: torch.Tensor | None = None,
                raw: bool = False) -> torch.Tensor:
        eos = self.model.eos_ids
        out = []
        for r in responses:
            kids = [list(r) if t in eos else [*r, t] for t in range(self.model.vocab_size)]
            out.append(self.sign * torch.tensor(self.ann.score(prompt, kids)))
        return torch.stack(out)

    def share(self) -> Mrm:
        raise NotImplementedError  # a benchmark reads one instance; nothing shares it across workers


def _examples(n: int) -> list[Example]:
    return [Example(id=f"s{i}", prompt=f"question {i}: how?", response=f"Answer {i}: do this, then that.")
            for i in range(n)]


def test_sibling_ranking_scores_an_exact_mrm_perfectly_and_a_reversed_one_at_zero(tiny_dir: Path) -> None:
    from saffron.bench.mrm import sibling_ranking
    from tests.test_mrm_train import CountingGuard

    policy = load_model(str(tiny_dir))
    reward = CountingGuard(policy)
    good = sibling_ranking(OracleMrm(reward, policy, 1.0), reward, policy, _examples(2), 4, per_prompt=2,
                           max_children=6, progress=False)
    assert good["sibling_nodes"] == 4 and good["sibling_children_mean"] == 6 and good["sibling_rm_calls"] == 24
    assert good["overlap_at_1"] == good["overlap_at_4"] == 1.0 and good["spearman_siblings"] == pytest.approx(1.0)
    assert good["sibling_top1_regret"] == 0.0 and good["overlap_at_16"] is None  # no node has 17 children
    assert good["chance_overlap_at_4"] == pytest.approx(4 / 6) and good["sibling_nodes_at_16"] == 0
    assert good["sibling_unseen_share"] == 0.0
    bad = sibling_ranking(OracleMrm(reward, policy, -1.0), reward, policy, _examples(2), 4, per_prompt=2,
                          max_children=6, progress=False)
    assert bad["overlap_at_1"] == 0.0 and bad["spearman_siblings"] == pytest.approx(-1.0)
    assert bad["sibling_top1_regret"] > 0
    # the policy's ranking does not depend on the MRM's
    for k in ("policy_overlap_at_1", "policy_overlap_at_4", "policy_spearman_siblings"):
        assert good[k] == bad[k] and good[k] is not None
    with pytest.raises(SaffronError, match="max_children >= 2"):
        sibling_ranking(OracleMrm(reward, policy, 1.0), reward, policy, _examples(1), 1, max_children=1)


def test_bench_mrm_reports_sibling_ranking_for_a_head_mrm(tmp_path: Path, tiny_dir: Path, prm_data: Path) -> None:
    from saffron.bench.mrm import bench_mrm
    from saffron.mrm.train.head import train_head_mrm
    from tests.test_mrm_train import CountingGuard

    opts = {k: v for k, v in OPTS.items() if k != "epochs"}
    train_head_mrm(prm_data, tmp_path / "mrm", base_model=str(tiny_dir), epochs=5, **opts)
    _, rows = read_rewards(prm_data)
    policy = load_model(str(tiny_dir))
    res = bench_mrm(str(tmp_path / "mrm"), rows[:2], split=None, progress=False, siblings=3,
                    sibling_per_prompt=3, max_children=5, reward=CountingGuard(policy), examples=_examples(1))
    assert res["n_heldout_rows"] == 2 and res["sibling_nodes"] == 3 and res["sibling_reward_model"] == "test-guard"
    for k in ("overlap_at_1", "overlap_at_4", "spearman_siblings", "policy_overlap_at_4"):
        assert res[k] is not None and -1.0 <= res[k] <= 1.0, k
