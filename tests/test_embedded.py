"""End to end on the embedded stack: SmolLM2 from the wheel, smol-guard, the offline held-out harmful pairs."""

import json
from pathlib import Path

import numpy as np
import pytest

from saffron.config import EvalConfig
from saffron.data import Example, guard_labelled, pyrit_harmful
from saffron.embedded import EMBEDDED_POLICY
from saffron.evaluate import run_eval
from saffron.guards.registry import load_guard
from saffron.model import load_model
from tests.conftest import embedded


@embedded
def test_embedded_policy_reads_everything_from_its_tokenizer() -> None:
    m = load_model(EMBEDDED_POLICY)
    assert m.eos_ids == {m.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert m.tokenizer.decode(m.chat_prompt_ids("hi")).endswith("<|im_start|>user\nhi<|im_end|>\n"
                                                                "<|im_start|>assistant\n")
    assert m.hf.dtype.is_floating_point and str(m.hf.dtype) == "torch.float32"


@embedded
def test_prefilling_attack_eval_on_heldout_pairs(tmp_path: Path) -> None:
    cfg = EvalConfig(method_options={"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0})
    m = run_eval(cfg, tmp_path / "run", limit=2, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    heldout = pyrit_harmful("test")[:2]
    assert [r["id"] for r in recs] == [e.id for e in heldout]
    pol = load_model(EMBEDDED_POLICY)
    for r, e in zip(recs, heldout, strict=True):
        assert e.response is not None
        assert pol.encode(r["prefill"]) == pol.encode(e.response)[:10]
        assert 0 < r["new_tokens"] <= 8 and r["flops"]["policy"] > 0
    assert set(m) >= {"asr", "mean_reward", "n", "tflops_per_prompt", "mean_new_tokens"} and m["n"] == 2


def _response(row: Example) -> str:
    assert row.response is not None  # every row here is a labelled (prompt, response) pair
    return row.response


@embedded
def test_shipped_guard_ranks_heldout_unsafe_below_safe() -> None:
    rows = guard_labelled("test")
    safe = [r for r in rows if not r.unsafe][:6]
    unsafe = [r for r in rows if r.unsafe][:6]
    guard = load_guard("smol-guard")
    rs = [guard.score(r.prompt, [_response(r)])[0] for r in safe]
    ru = [guard.score(r.prompt, [_response(r)])[0] for r in unsafe]
    assert np.mean(rs) > 0 > np.mean(ru)


@embedded
@pytest.mark.parametrize("spec", ["smol-mrm-head", "smol-mrm"])
def test_shipped_mrm_defends_on_the_embedded_stack(tmp_path: Path, spec: str) -> None:
    from saffron.mrm import load_mrm_spec

    mrm = load_mrm_spec(spec)
    assert mrm.manifest.base_model == EMBEDDED_POLICY and mrm.manifest.reward_model is not None
    assert 0 < int(mrm.unseen.sum()) < mrm.unseen.numel()
    # top_p=1: every step offers more than one child, so two outputs survive and the rerank calls the reward model
    cfg = EvalConfig(method="saffron", mrm=spec, method_options={"width": 2, "max_new_tokens": 4,
                                                                 "min_new_tokens": 2, "top_p": 1.0})
    m = run_eval(cfg, tmp_path / "s", limit=1, progress=False)
    rec = json.loads((tmp_path / "s" / "records.jsonl").read_text())
    assert m["n"] == 1 and 0 < rec["new_tokens"] <= 4
    assert rec["flops"]["mrm"] > 0 and rec["flops"]["reward"] > 0 and rec["flops"]["policy"] > 0
    # the head MRM reads the policy's states, so it costs a small fraction of the policy; the LoRA MRM runs a
    # second 135M model over the same nodes
    if spec == "smol-mrm-head":
        assert rec["flops"]["mrm"] < rec["flops"]["policy"] / 10
    else:
        assert rec["flops"]["mrm"] > rec["flops"]["policy"] / 4
