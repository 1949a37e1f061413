"""``--preset paper``: what it fixes for every method, what it refuses, and that results record it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from saffron.cli import main
from saffron.cli.serve import serve_preset
from saffron.compare import CompareConfig, point_config, validate_compare
from saffron.config import EvalConfig, resolve
from saffron.errors import SaffronError
from saffron.evaluate import run_eval
from saffron.methods.base import DEFAULT_MIN_NEW_TOKENS
from saffron.model import load_model_copy
from saffron.mrm.base import MrmManifest, tokenizer_fingerprint
from saffron.mrm.lora import add_lora, save_mrm
from saffron.presets import PAPER, PRESETS, get_preset
from tests.conftest import needs_plot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAPER_SAFFRON = {"top_p": 0.8, "final": "first", "no_repeat_ngram": 0, "per_parent": 0, "policy_weight": 0.0,
                 "diversity": 0.0, "min_new_tokens": 16, "max_new_tokens": 32}


def _lora_mrm(path: Path, tiny_dir: Path, eos_in_mask: bool, kind: str = "lora") -> Path:
    """A LoRA MRM folder over the tiny model whose manifest says whether EOS is in its mask (and the mask agrees)."""
    model = load_model_copy(str(tiny_dir), device="cpu")
    peft = add_lora(model)
    unseen = torch.zeros(model.vocab_size, dtype=torch.bool)
    if eos_in_mask:
        unseen[sorted(model.eos_ids)] = True
    man = MrmManifest(base_model=str(tiny_dir), tokenizer_sha256=tokenizer_fingerprint(model.tokenizer), kind=kind,
                      corpus={"eos_in_mask": eos_in_mask, "eos_supervised": not eos_in_mask})
    save_mrm(path, peft, man, torch.zeros(model.vocab_size), unseen)
    return path


@pytest.fixture(scope="module")
def paper_mrm(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return _lora_mrm(tmp_path_factory.mktemp("paper-mrm") / "m", tiny_dir, eos_in_mask=True)


def _dataset(tmp_path: Path, n: int = 2) -> str:
    p = tmp_path / "ds.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}?", "response": f"Sure, {i} is"}) + "\n"
                         for i in range(n)))
    return f"jsonl:{p}"


def test_the_paper_preset_is_saffron_1_as_published() -> None:
    assert PRESETS == {"paper": PAPER} and get_preset("paper") is PAPER
    assert PAPER.mrm == "smol-mrm" and PAPER.mrm_kind == "lora" and PAPER.mrm_eos_in_mask is True
    assert dict(PAPER.every_method) == {"min_new_tokens": 16, "max_new_tokens": 32}
    assert PAPER.every_method["min_new_tokens"] == DEFAULT_MIN_NEW_TOKENS  # the server relies on it
    with pytest.raises(SaffronError, match="unknown preset 'arxiv'; known: paper"):
        get_preset("arxiv")


def test_resolve_fixes_every_methods_lengths_and_saffrons_search(paper_mrm: Path) -> None:
    s = resolve(EvalConfig(method="saffron", preset="paper", mrm=str(paper_mrm), method_options={"width": 8}))
    assert s.method_options == {"width": 8, **PAPER_SAFFRON} and s.mrm == str(paper_mrm)
    assert s.reward is None  # final=first calls no reward model
    for method in ("none", "best-of-n", "rejection", "rebase", "deal-mcts"):
        b = resolve(EvalConfig(method=method, preset="paper", mrm=str(paper_mrm)))
        assert b.method_options == {"min_new_tokens": 16, "max_new_tokens": 32}, method
        assert b.mrm is None
    # idempotent: resolving a resolved configuration changes nothing
    assert resolve(s) == s


@pytest.mark.parametrize(("cfg", "msg"), [
    ({"method_options": {"final": "rerank"}}, "--preset paper sets final=first; -o final=rerank contradicts it"),
    ({"method_options": {"policy_weight": 1}}, "sets policy_weight=0.0; -o policy_weight=1 contradicts it"),
    ({"method_options": {"top_p": 0.9}}, "--preset paper sets top_p=0.8; --top-p 0.9 contradicts it"),
    ({"method_options": {"max_new_tokens": 64}}, "sets max_new_tokens=32; --max-new-tokens 64 contradicts it"),
    ({"method_options": {"min_new_tokens": 0}}, "sets min_new_tokens=16; -o min_new_tokens=0 contradicts it"),
    ({"mrm": "smol-mrm-head"}, "--mrm smol-mrm-head is a head MRM, not the paper's lora form"),
    ({"preset": "arxiv"}, "unknown preset 'arxiv'"),
])
def test_a_contradicting_option_is_refused_naming_it(cfg: dict[str, Any], msg: str) -> None:
    with pytest.raises(SaffronError) as e:
        resolve(EvalConfig(**{"method": "saffron", "preset": "paper", **cfg}))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_an_mrm_that_supervises_eos_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    seen = _lora_mrm(tmp_path / "seen", tiny_dir, eos_in_mask=False)
    with pytest.raises(SaffronError, match=r"has eos_in_mask=False .* `saffron train-mrm --eos mask`"):
        resolve(EvalConfig(method="saffron", preset="paper", mrm=str(seen)))
    # baselines use no MRM: nothing to check
    assert resolve(EvalConfig(method="best-of-n", preset="paper", mrm=str(seen))).mrm is None


def test_eval_under_the_preset_records_it(tmp_path: Path, tiny_dir: Path, paper_mrm: Path) -> None:
    cfg = resolve(EvalConfig(method="saffron", preset="paper", mrm=str(paper_mrm), dataset=_dataset(tmp_path),
                             policy=str(tiny_dir), judges=(f"llama-guard-3:{tiny_dir}",), prefill_tokens=2,
                             method_options={"width": 2}))
    m = run_eval(cfg, tmp_path / "run", None, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["preset"] == "paper" and {"width": 2, **PAPER_SAFFRON}.items() <= saved["method_options"].items()
    assert m["n"] == 2 and 16 <= m["mean_new_tokens"] <= 32
    # without a preset, config.json has no such key (folders written before presets still resume)
    assert "preset" not in EvalConfig().as_dict()


def test_eval_cli_refuses_a_contradiction_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "--method", "saffron", "--preset", "paper", "-o", "final=rerank", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: --preset paper sets final=first; -o final=rerank contradicts it\n"
    assert not (tmp_path / "o").exists()


@needs_plot
def test_compare_gives_the_baselines_the_same_lengths(tmp_path: Path, paper_mrm: Path) -> None:
    base = EvalConfig(preset="paper", mrm=str(paper_mrm), method_options={"max_new_tokens": 32})
    cc = CompareConfig(methods=("none", "best-of-n", "rebase", "deal-mcts", "saffron"), budgets=(2,), base=base)
    validate_compare(cc)
    for m in cc.methods:
        opts = point_config(cc, m, 2).method_options
        assert (opts["min_new_tokens"], opts["max_new_tokens"]) == (16, 32), m
    assert point_config(cc, "saffron", 2).method_options["final"] == "first"
    bad = CompareConfig(methods=("saffron",), budgets=(2,), base=base,
                        method_options={"saffron": {"per_parent": 2}})
    with pytest.raises(SaffronError, match="sets per_parent=0; -o saffron:per_parent=2 contradicts it"):
        validate_compare(bad)


def test_serve_under_the_preset(paper_mrm: Path) -> None:
    opts, mrm = serve_preset("paper", "saffron", {"width": 4}, str(paper_mrm), 32)
    assert opts == {"width": 4, **{k: v for k, v in PAPER_SAFFRON.items() if not k.endswith("new_tokens")}}
    assert mrm == str(paper_mrm)
    with pytest.raises(SaffronError, match="--max-new-tokens 64 contradicts it"):
        serve_preset("paper", "saffron", {}, str(paper_mrm), 64)
    with pytest.raises(SaffronError, match=r"-o diversity=0\.5 contradicts it"):
        serve_preset("paper", "saffron", {"diversity": 0.5}, str(paper_mrm), 32)
