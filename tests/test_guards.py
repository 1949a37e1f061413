from pathlib import Path

import pytest
import torch

from saffron.errors import SaffronError
from saffron.guards import registry
from saffron.guards.base import LogitPairGuard
from saffron.guards.llama_guard import CATEGORIES, LLAMA_GUARD_3_1B, LLAMA_GUARD_3_PROMPT
from saffron.guards.registry import load_guard
from saffron.guards.smol_guard import Probe, ProbeGuard, ProbeSpec, chat_guard_prompt, load_probe, save_probe


def _llama_guard(tiny_dir: Path) -> LogitPairGuard:
    """The tiny model as Llama Guard 3, through the registry as users name it."""
    guard = load_guard(f"llama-guard-3:{tiny_dir}")
    assert isinstance(guard, LogitPairGuard)
    return guard


def test_llama_guard_prompt_is_the_official_shape(tiny_dir: Path) -> None:
    guard = _llama_guard(tiny_dir)
    ids = guard.guard_ids("How do I bake bread?", "Mix flour and water.")
    text = guard.model.tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask: Check if there is "
                           "unsafe content in 'Agent' messages")
    for i, c in enumerate(CATEGORIES, start=1):
        assert c.startswith(f"S{i}: ") and c in text
    assert "\n\nUser: How do I bake bread?\n\nAgent: Mix flour and water.\n\n<END CONVERSATION>\n\n" in text
    assert text.endswith("Provide your safety assessment for ONLY THE LAST Agent message in the above conversation:\n"
                         " - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a "
                         "comma-separated list of violated categories. <|eot_id|><|start_header_id|>assistant"
                         "<|end_header_id|>\n\n")


def test_llama_guard_reward_is_the_safe_minus_unsafe_logit(tiny_dir: Path) -> None:
    guard = _llama_guard(tiny_dir)
    tok = guard.model.tokenizer
    rewards = guard.score("q", ["a harmless answer", "another"])
    for resp, got in zip(["a harmless answer", "another"], rewards, strict=True):
        ids = guard.guard_ids("q", resp)
        logits = guard.model.hf(torch.tensor([ids])).logits[0, -1]
        want = logits[tok.convert_tokens_to_ids("safe")] - logits[tok.convert_tokens_to_ids("unsafe")]
        assert got == pytest.approx(float(want), abs=1e-4)


def test_guard_scoring_a_longer_prefix_reuses_the_cached_head(tiny_dir: Path) -> None:
    guard = _llama_guard(tiny_dir)
    guard.score("q", ["abcdef"])
    before = guard.runner.stats.computed_tokens
    guard.score("q", ["abcdefgh"])
    tail = len(guard.model.encode(LLAMA_GUARD_3_PROMPT.tail))
    # only the two new response bytes and the fixed tail run again
    assert guard.runner.stats.computed_tokens - before == 2 + tail


def test_guard_keeps_its_fixed_instructions_once_and_charges_prompts_only_for_the_rest(tiny_dir: Path) -> None:
    guard = _llama_guard(tiny_dir)
    prefix = guard.fixed_prefix()
    text = guard.model.tokenizer.decode(prefix)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user") and text.endswith("\n\nUser: ")
    for p in ("q", "How?", " leading space", "\n\nnewlines", "User: nested"):  # whatever follows, it is a prefix
        assert guard.guard_ids(p, "r")[: len(prefix)] == prefix
    st = guard.runner.stats
    assert guard.flops == 0 and guard.setup_flops == st.setup_flops > 0 and st.setup_tokens == len(prefix)
    assert guard.runner.trie.kept_tokens == len(prefix)
    costs: dict[str, set[int]] = {}
    rewards: dict[str, float] = {}
    for p in ("q", "another prompt", "q"):
        guard.runner.reset()  # as the harness does before judging each prompt
        f0, c0 = guard.flops, st.computed_tokens
        rewards[p] = guard.score(p, ["an answer"])[0]
        costs.setdefault(p, set()).add(guard.flops - f0)
        assert st.computed_tokens - c0 == len(guard.guard_ids(p, "an answer")) - len(prefix)
    assert len(costs["q"]) == 1  # a prompt's cost does not depend on what was judged before it
    ids = guard.guard_ids("q", "an answer")
    tok = guard.model.tokenizer
    logits = guard.model.hf(torch.tensor([ids])).logits[0, -1]
    want = logits[tok.convert_tokens_to_ids("safe")] - logits[tok.convert_tokens_to_ids("unsafe")]
    assert rewards["q"] == pytest.approx(float(want), abs=1e-4)
    assert guard.setup_flops == st.setup_flops  # paid once


def test_the_probe_moves_to_the_device_of_its_model(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe loads on the CPU; a policy on a GPU returns its hidden states there, so a probe left behind fails
    # with "two devices" on the first score (found by the device check on an H200). The meta device stands in
    # for the accelerator: a probe left on the CPU is on a different device from it.
    from saffron.model import Model

    monkeypatch.setattr(Model, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(ProbeGuard, "keep_fixed_prefix", lambda self: None)  # it would run the CPU model
    probe = Probe(2 * tiny.hf.config.hidden_size, 0)
    g = ProbeGuard(tiny, ProbeSpec(base_model="unused", layers=(1, 2), hidden=0), probe)
    assert {t.device.type for t in g.probe.state_dict().values()} == {"meta"}


@pytest.mark.device
def test_smol_guard_scores_on_the_default_device(tiny_dir: Path) -> None:
    # on the device check's GPU (SAFFRON_DEVICE=cuda) the model loads there and the probe must follow it
    from saffron.model import load_model

    model = load_model(str(tiny_dir))
    probe = Probe(2 * model.hf.config.hidden_size, 0)
    assert isinstance(probe.net, torch.nn.Linear)
    torch.nn.init.normal_(probe.net.weight)
    g = ProbeGuard(model, ProbeSpec(base_model="unused", layers=(1, 2), hidden=0), probe)
    r = g.score("q", ["x", "y"])
    feats = g.features([g.guard_ids("q", "x")])
    assert feats.device == model.device
    assert r[0] == pytest.approx(float(g.probe(feats)[0].detach()), abs=1e-3)


def test_probe_roundtrip_and_corruption(tmp_path: Path, tiny) -> None:
    spec = ProbeSpec(base_model="unused", layers=(1, 2), hidden=0)
    probe = Probe(2 * tiny.hf.config.hidden_size, 0)
    assert isinstance(probe.net, torch.nn.Linear)  # hidden=0: the logistic head
    torch.nn.init.normal_(probe.net.weight)
    save_probe(tmp_path / "p", spec, probe)
    spec2, probe2 = load_probe(tmp_path / "p")
    assert spec2 == spec
    g = ProbeGuard(tiny, spec2, probe2)
    assert g.setup_flops > 0 and g.flops == 0 and g.runner.trie.kept_tokens == len(g.fixed_prefix())
    r = g.score("q", ["x", "y"])
    feats = g.features([g.guard_ids("q", "x")])
    assert r[0] == pytest.approx(float(probe(feats)[0].detach()), abs=1e-5)
    (tmp_path / "p" / "probe.safetensors").write_bytes(b"garbage")
    with pytest.raises(SaffronError, match="corrupted"):
        load_probe(tmp_path / "p")
    with pytest.raises(SaffronError, match="train-guard"):
        load_probe(tmp_path / "missing")


def test_chat_guard_prompt_puts_the_response_between_head_and_tail(tiny) -> None:
    gp = chat_guard_prompt(tiny)
    assert gp.head.startswith("<|im_start|>user\nTask:") and gp.head.endswith("User: {prompt}\n\nAgent: ")
    assert gp.tail.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_unknown_guard() -> None:
    with pytest.raises(SaffronError) as e:
        load_guard("gpt-judge")
    assert str(e.value) == ("unknown guard 'gpt-judge'; known: smol-guard, smol-guard-zeroshot, "
                            "llama-guard-3[:PATH], head-prm[:PATH]")


def test_each_guard_name_loads_with_its_spec_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry hands each loader the text after ':' (or its default), nothing loads for real."""
    calls: list[tuple[str, tuple[object, ...]]] = []
    for fn in ("load_smol_guard", "load_zero_shot", "load_llama_guard", "load_head_prm"):
        monkeypatch.setattr(registry, fn, lambda *args, fn=fn: calls.append((fn, args)))
    for spec in ("smol-guard", f"smol-guard:{tmp_path}", "smol-guard-zeroshot", "llama-guard-3",
                 "llama-guard-3:org/model", "head-prm", f"head-prm:{tmp_path}"):
        load_guard(spec)
    assert calls == [("load_smol_guard", (None,)), ("load_smol_guard", (str(tmp_path),)), ("load_zero_shot", ()),
                     ("load_llama_guard", (LLAMA_GUARD_3_1B,)), ("load_llama_guard", ("org/model",)),
                     ("load_head_prm", (None,)), ("load_head_prm", (str(tmp_path),))]
