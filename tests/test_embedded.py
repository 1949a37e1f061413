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


def _tiny_gguf(path: Path, eos: int) -> Path:
    """A GGUF holding only a byte-level BPE tokenizer's metadata (no tensors): 3 control tokens, the 256 byte
    symbols, one merge."""
    from gguf import GGUFWriter
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *sorted(ByteLevel.alphabet()), "ab"]
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("eos", [2, 1])
def test_the_tokenizer_comes_from_the_gguf_metadata(tmp_path: Path, eos: int) -> None:
    # transformers' own GGUF converter made a different tokenizer in 5.17 than in 5.25 (end of sequence
    # <|im_start|>, a byte-fallback decoder); the embedded model's tokenizer is built from the metadata instead
    from saffron.embedded import gguf_tokenizer

    tok = gguf_tokenizer(_tiny_gguf(tmp_path / "t.gguf", eos))
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) == (eos, eos, 1, 0)
    assert tok.eos_token == names[eos]
    assert {i for i, t in tok.added_tokens_decoder.items() if t.special} == {0, 1, 2}
    ids = tok("ab a<|im_end|>", add_special_tokens=True)["input_ids"]
    assert ids[0] == len(tok) - 1 and ids[-1] == 2  # the merge applies, no BOS is added, the special stays one id
    assert tok.decode(ids) == "ab a<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<|im_start|>x<|im_end|>"


@embedded
def test_the_embedded_tokenizer_is_the_one_the_shipped_mrms_were_trained_with() -> None:
    from saffron.embedded import converted_dir, gguf_path, gguf_tokenizer
    from saffron.mrm.base import tokenizer_fingerprint

    shipped = {json.loads((Path(__file__).parents[1] / "src/saffron/assets" / a / "saffron.json").read_text())[
        "tokenizer_sha256"] for a in ("smol_mrm", "smol_mrm_head", "smol_prm_head")}
    tok = gguf_tokenizer(gguf_path())
    assert {tokenizer_fingerprint(tok)} == shipped
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    saved = json.loads((converted_dir() / "tokenizer.json").read_text())
    assert saved["decoder"]["type"] == "ByteLevel" and saved["model"]["byte_fallback"] is False
