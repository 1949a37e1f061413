"""The MRM format: the authors' released files are read and applied, the bias really is applied at inference."""

from pathlib import Path

import pytest
import torch

from saffron.model import Model
from saffron.mrm.lora import apply_mrm
from saffron.mrm.registry import inspect_mrm
from tests.conftest import make_tokenizer

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream-saffron-1"
needs_upstream = pytest.mark.skipif(not UPSTREAM.is_dir(), reason=f"authors' released MRM files not found at "
                                    f"{UPSTREAM} (they live beside the repository, not in it)")


@pytest.mark.embedded
@needs_upstream
def test_inspect_reads_the_released_files() -> None:
    info = inspect_mrm(UPSTREAM)
    assert info["base_model"] == "meta-llama/Llama-Guard-3-1B"
    assert (info["lora_r"], info["lora_alpha"], info["target_modules"]) == (4, 4, ["q_proj", "v_proj"])
    assert info["vocab_size"] == 128256 and info["unseen_tokens"] == 92013
    assert info["adapter_tensors"] == 64


def _llama_guard_3_1b_shaped_zero_model() -> Model:
    """Llama-Guard-3-1B's shapes, weights all zero: allocating zeros is cheap, and a zero backbone makes the
    MRM's output exactly its bias, which is what the test checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    # transformers declares PreTrainedModel.to as @wraps(torch.nn.Module.to), which mypy reads as unbound
    hf = hf.to_empty(device="cpu").to(torch.bfloat16)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        hf.model.rotary_emb.inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    hf.eval()
    return Model(name="llama-guard-3-1b-shaped", hf=hf, tokenizer=make_tokenizer(), eos_ids=frozenset({0}))


@pytest.mark.embedded
@pytest.mark.slow
@needs_upstream
def test_released_mrm_applies_to_a_llama_guard_3_1b_shaped_model() -> None:
    from safetensors.torch import load_file

    model = _llama_guard_3_1b_shaped_zero_model()
    mrm = apply_mrm(model, UPSTREAM)
    files = load_file(str(UPSTREAM / "adapter_model.safetensors"))
    lora_b = model.hf.model.layers[3].self_attn.v_proj.lora_B["default"].weight
    assert torch.equal(lora_b.float(), files["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"].float())
    rewards = mrm.rewards("a prompt", [[5, 6, 7]])[0]
    bias = torch.load(UPSTREAM / "lm_head_bias.pt", map_location="cpu", weights_only=True).float()
    unseen = torch.load(UPSTREAM / "unseen_mask.pt", map_location="cpu", weights_only=True)
    assert int((rewards == -1024).sum()) == 92013
    # zero backbone: every seen token's reward is exactly the bias, so the bias is applied at inference
    torch.testing.assert_close(rewards[~unseen], bias.to(torch.bfloat16).float()[~unseen])


@pytest.mark.embedded
@needs_upstream
def test_cli_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from saffron.cli import main

    main(["mrm", "inspect", str(UPSTREAM), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["base_model"] == "meta-llama/Llama-Guard-3-1B" and info["unseen_tokens"] == 92013


def test_cli_inspects_the_embedded_mrms_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from saffron.cli import main

    main(["mrm", "inspect", "smol-mrm-head", "--json"])
    head = json.loads(capsys.readouterr().out)
    main(["mrm", "inspect", "smol-mrm", "--json"])
    lora = json.loads(capsys.readouterr().out)
    assert head["kind"] == "head" and head["layers"] == [10, 14, 18, 22, 26, 30] and head["flops_per_node"] > 0
    assert lora["lora_r"] == 4 and lora["base_model"] == head["base_model"] == "smollm2-135m-instruct"
    with pytest.raises(SystemExit) as e:
        main(["mrm", "inspect", "no-such-mrm"])
    assert e.value.code != 0 and "neither an embedded MRM" in capsys.readouterr().err


def test_cli_inspects_the_head_prm_as_reward_takes_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``head-prm`` and ``head-prm:PATH`` name a head PRM in ``--reward``; inspect resolves them the same way."""
    import json

    from saffron.cli import main
    from saffron.mrm.prm import ASSET

    main(["mrm", "inspect", "head-prm", "--json"])
    by_name = json.loads(capsys.readouterr().out)
    assert by_name["kind"] == "prm" and by_name["path"] == str(ASSET)
    main(["mrm", "inspect", f"head-prm:{ASSET}", "--json"])
    assert json.loads(capsys.readouterr().out) == by_name
    with pytest.raises(SystemExit) as e:
        main(["mrm", "inspect", f"head-prm:{tmp_path / 'none'}"])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err


def test_inspect_refuses_a_corrupted_adapter(tmp_path: Path) -> None:
    from saffron.errors import SaffronError

    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SaffronError, match="corrupted"):
        inspect_mrm(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(SaffronError, match="corrupted"):
        inspect_mrm(tmp_path)
