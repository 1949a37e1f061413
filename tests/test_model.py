from pathlib import Path

import pytest
import torch

from saffron.errors import SaffronError
from saffron.model import load_model
from saffron.runner import Runner


def test_eos_and_chat_template_come_from_the_tokenizer(tiny) -> None:
    assert tiny.eos_ids == {tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    ids = tiny.chat_prompt_ids("hi")
    assert tiny.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_conversation_goes_through_the_chat_template(tiny) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "why?"}]
    assert tiny.tokenizer.decode(tiny.chat_messages_ids(msgs)) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!"
        "<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n")
    assert tiny.chat_messages_ids(msgs[1:2]) == tiny.chat_prompt_ids("hi")
    with pytest.raises(SaffronError, match=r"message 1 \(user\) is empty"):
        tiny.chat_messages_ids([msgs[0], {"role": "user", "content": " "}])
    with pytest.raises(SaffronError, match="no messages"):
        tiny.chat_messages_ids([])


def test_bad_sequences_are_refused(tiny) -> None:
    with pytest.raises(SaffronError, match="empty"):
        tiny.check_ids([])
    with pytest.raises(SaffronError, match=r"outside .* vocabulary"):
        tiny.check_ids([tiny.vocab_size])
    with pytest.raises(SaffronError, match="context limit of 2048"):
        tiny.check_ids([1] * 2020, reserve=32)
    with pytest.raises(SaffronError, match="prompt is empty"):
        tiny.chat_prompt_ids("  \n ")


def test_bad_model_specs(tmp_path: Path) -> None:
    with pytest.raises(SaffronError, match="not a model folder"):
        load_model(str(tmp_path))
    with pytest.raises(SaffronError, match="could not be loaded"):
        load_model("no-such-owner/no-such-model-xyz")
    with pytest.raises(SaffronError, match="not found"):
        load_model("./missing-folder")


def test_runner_matches_full_recompute_and_counts_only_new_tokens(tiny) -> None:
    r = Runner(tiny)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, tiny.vocab_size, (20,), generator=g).tolist()
    seqs = [base, base + [5, 6, 7], base[:12] + [9], base + [5, 6, 7, 8]]
    got = r.forward(seqs).logits
    assert got is not None
    for s, lg in zip(seqs, got, strict=True):
        full = tiny.hf(torch.tensor([s])).logits[0, -1]
        torch.testing.assert_close(lg, full, atol=1e-4, rtol=1e-4)
    # every unique token once: base (20), [5, 6, 7], the [9] branch, then [8]
    assert r.stats.computed_tokens == 20 + 3 + 1 + 1
    assert r.stats.reused_tokens == 0 + 20 + 12 + 23  # later sequences in the batch ride on earlier ones
    r.forward([base + [5, 6]])  # fully cached: only its last token runs again, for its output
    assert r.stats.computed_tokens == 26
    r.reset()
    r.forward([base])
    assert r.stats.computed_tokens == 26 + 20
