"""The runner against full recompute, for every sharing pattern (property-based), on a tiny random Llama."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saffron.errors import SaffronError
from saffron.flops import straight_flops
from saffron.model import Model
from saffron.runner import Runner


def _reference(model: Model, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model.hf(torch.tensor([seq])).logits[0, -1]
    return logits


token = st.integers(min_value=0, max_value=40)
# batches built from a few shared stems, so prefixes overlap in every pattern: equal, nested, diverging
batches = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12), st.lists(token, max_size=6)),
                   min_size=1, max_size=6)
stems = st.lists(st.lists(token, min_size=1, max_size=14), min_size=3, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stems=stems, calls=st.lists(batches, min_size=1, max_size=3))
def test_logits_equal_full_recompute_and_each_unique_token_runs_once(tiny, stems, calls) -> None:
    r = Runner(tiny)
    seen: set[tuple[int, ...]] = set()
    want_computed = 0
    for batch in calls:
        seqs = []
        for stem_i, cut, tail in batch:
            s = stems[stem_i][: max(1, cut)] + tail
            seqs.append(s)
        for s in seqs:
            prefixes = {tuple(s[:i]) for i in range(1, len(s) + 1)}
            new = prefixes - seen
            want_computed += len(new) if new else 1  # a fully cached sequence re-runs its last token
            seen |= prefixes
        out = r.forward(seqs).logits
        assert out is not None
        for s, lg in zip(seqs, out, strict=True):
            torch.testing.assert_close(lg, _reference(tiny, s), atol=2e-4, rtol=2e-4)
    # duplicates inside one batch share their recompute, so this is an upper bound that is exact without them
    assert r.stats.computed_tokens <= want_computed
    assert r.stats.trie.stored_tokens == len(seen)


def test_hidden_states_match_transformers(tiny) -> None:
    r = Runner(tiny)
    seq = list(range(3, 20))
    layers = list(range(tiny.hf.config.num_hidden_layers + 1))
    r.forward([seq[:9]])  # part of it cached first
    got = r.forward([seq], logits=False, hidden_layers=layers).hidden
    with torch.inference_mode():
        ref = tiny.hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
    assert got is not None and len(ref) == len(layers)
    for i in layers:
        torch.testing.assert_close(got[0, i], ref[i][0, -1], atol=1e-4, rtol=1e-4)


def test_eviction_under_a_tight_budget_keeps_results_exact(tiny) -> None:
    r0 = Runner(tiny)
    r = Runner(tiny, budget_bytes=40 * r0.pool.bytes_per_token)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        seq = torch.randint(0, 50, (25,), generator=g).tolist()
        lg = r.forward([seq]).logits
        assert lg is not None
        torch.testing.assert_close(lg[0], _reference(tiny, seq), atol=2e-4, rtol=2e-4)
    assert r.stats.trie.evicted_tokens > 0 and r.stats.trie.stored_tokens <= 40


def test_budget_and_input_errors(tiny) -> None:
    with pytest.raises(SaffronError, match="smaller than one token"):
        Runner(tiny, budget_bytes=10)
    r = Runner(tiny, budget_bytes=8 * Runner(tiny).pool.bytes_per_token)
    with pytest.raises(SaffronError, match="more than the cache budget"):
        r.forward([list(range(20))])
    with pytest.raises(SaffronError, match="empty"):
        r.forward([[]])
    with pytest.raises(SaffronError, match="outside"):
        r.forward([[tiny.vocab_size + 5]])
    with pytest.raises(SaffronError, match="hidden layer 99"):
        r.forward([[1, 2]], hidden_layers=[99])


def test_flops_of_a_straight_sequence(tiny) -> None:
    r = Runner(tiny)
    r.forward([list(range(10))])
    assert r.flops == straight_flops(r.arch, 10, 0, 1)
    r.forward([list(range(12))])
    # 2 new queries over the 12 live slots
    assert r.flops == straight_flops(r.arch, 10, 0, 1) + straight_flops(r.arch, 2, 10, 1)


def test_unsupported_architecture_is_named_and_runs_uncached_only_on_request(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from saffron.device import Placement, placed
    from saffron.model import load_model
    from tests.conftest import make_tokenizer

    tok = make_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = load_model(str(tmp_path), device="cpu")
    with placed(Placement(runner="cached")), pytest.raises(SaffronError, match="does not support architecture 'gpt2'"):
        Runner(m)
    with pytest.raises(SaffronError, match="does not support architecture 'gpt2'"):
        Runner(m, allow_uncached=False)
    assert not Runner(m).cached  # --runner auto (the default): full recompute
    r = Runner(m, allow_uncached=True)
    seq = [5, 6, 7, 8]
    lg = r.forward([seq, seq[:3]]).logits
    assert lg is not None
    torch.testing.assert_close(lg[0], _reference(m, seq), atol=1e-4, rtol=1e-4)
    assert r.stats.computed_tokens == 7 and r.flops > 0


def test_sparse_batches_gather_their_keys_and_stay_exact(tiny) -> None:
    r = Runner(tiny)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 50, (15,), generator=g).tolist() for _ in range(8)]
    r.forward([seqs[0]])
    assert r.stats.gathered_forwards == 0  # the only sequence fills the whole live range
    for s in seqs[1:]:
        r.forward([s])  # each new sequence attends to its own 15 slots out of >= 30 live ones
    assert r.stats.gathered_forwards == 7
    probe = seqs[3] + [7, 8]  # its path is 17 of the 122 live slots
    lg = r.forward([probe]).logits
    assert lg is not None and r.stats.gathered_forwards == 8
    torch.testing.assert_close(lg[0], _reference(tiny, probe), atol=2e-4, rtol=2e-4)
    dense = [s + [9] for s in seqs]  # every live slot is on some path: no gather
    r.forward(dense)
    assert r.stats.gathered_forwards == 8


def test_truncated_runner_matches_the_full_stack_below_its_depth(tiny) -> None:
    seqs = [[5, 6, 7, 8, 9], [5, 6, 7, 10]]
    full, cut = Runner(tiny), Runner(tiny, depth=1)
    want = full.forward(seqs, logits=False, hidden_layers=(0, 1)).hidden
    got = cut.forward(seqs, logits=False, hidden_layers=(0, 1)).hidden
    assert want is not None and got is not None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert 0 < cut.flops < full.flops
    assert cut.pool.bytes_per_token < full.pool.bytes_per_token  # keys of the skipped blocks are never stored
    with pytest.raises(SaffronError, match="hidden states, not logits"):
        cut.forward(seqs)
    with pytest.raises(SaffronError, match="hidden layer 2 out of range"):
        cut.forward(seqs, logits=False, hidden_layers=(2,))
    with pytest.raises(SaffronError, match="depth 0 out of range"):
        Runner(tiny, depth=0)


def test_kept_prefix_is_computed_once_survives_reset_and_is_setup_not_flops(tiny) -> None:
    r = Runner(tiny)
    prefix = list(range(3, 23))
    assert r.keep(prefix) == 20
    setup = straight_flops(r.arch, 20, 0, 0)
    assert r.flops == 0 and r.stats.setup_flops == setup
    assert r.stats.setup_tokens == r.stats.computed_tokens == 20
    assert r.keep(prefix) == 20 and r.keep(prefix[:7]) == 7  # already kept: nothing runs
    assert r.stats.computed_tokens == 20 and r.stats.setup_flops == setup and r.stats.calls == 1
    for suffix in ([30, 31, 32], [40, 41], [30, 31, 32]):  # each prompt costs the same whatever came before
        r.forward([prefix + [7, 8, 9], [5, 6]])  # a previous prompt's search, dropped by reset
        r.reset()
        assert r.stats.trie.stored_tokens == 20 and r.trie.cached_length(prefix + [7]) == 20
        computed, reused, flops = r.stats.computed_tokens, r.stats.reused_tokens, r.flops
        lg = r.forward([prefix + suffix]).logits
        assert lg is not None
        assert r.stats.computed_tokens - computed == len(suffix)
        assert r.stats.reused_tokens - reused == 20
        assert r.flops - flops == straight_flops(r.arch, len(suffix), 20, 1)
        torch.testing.assert_close(lg[0], _reference(tiny, prefix + suffix), atol=2e-4, rtol=2e-4)
    assert r.stats.setup_flops == setup


def test_keep_charges_setup_only_for_what_was_not_cached(tiny) -> None:
    r = Runner(tiny)
    r.forward([list(range(3, 11))])
    paid = r.flops
    assert r.keep(list(range(3, 15))) == 12
    assert r.flops == paid and r.stats.setup_flops == straight_flops(r.arch, 4, 8, 0)
    assert r.keep(list(range(3, 11))) == 8 and r.stats.setup_tokens == 4  # cached already: marked, not run


def test_eviction_under_a_tight_budget_never_evicts_the_kept_prefix(tiny) -> None:
    r = Runner(tiny, budget_bytes=40 * Runner(tiny).pool.bytes_per_token)
    prefix = list(range(60, 75))
    r.keep(prefix)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        seq = torch.randint(0, 50, (12,), generator=g).tolist()
        for s in (seq, prefix + seq[:4]):
            lg = r.forward([s]).logits
            assert lg is not None
            torch.testing.assert_close(lg[0], _reference(tiny, s), atol=2e-4, rtol=2e-4)
        assert r.trie.cached_length(prefix) == 15
    assert r.stats.trie.evicted_tokens > 0 and r.stats.trie.stored_tokens <= 40
    with pytest.raises(SaffronError, match="cannot hold this batch"):
        r.forward([list(range(100, 130))])  # 30 tokens fit the budget but not beside the 15 kept ones


def test_a_runner_without_a_cache_keeps_nothing(tiny) -> None:
    r = Runner(tiny, cache=False)
    assert r.keep([5, 6, 7]) == 0
    assert r.stats.setup_flops == 0 and r.stats.computed_tokens == 0
    r.forward([[5, 6, 7, 8]])
    assert r.flops == straight_flops(r.arch, 4, 0, 1)


@pytest.mark.usefixtures("one_torch_thread")
def test_batches_under_eviction_pressure_match_a_large_cache_and_survive_a_refused_batch(tiny) -> None:
    big = Runner(tiny)  # 4 GiB of cache: never evicts
    r = Runner(tiny, budget_bytes=30 * big.pool.bytes_per_token)
    g = torch.Generator().manual_seed(4)

    def fresh(n: int) -> list[int]:
        return torch.randint(0, 50, (n,), generator=g).tolist()

    def same_as_big(seqs: list[list[int]]) -> None:
        got, want = r.forward(seqs).logits, big.forward(seqs).logits
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        assert r.stats.trie.stored_tokens <= 30

    # Batches sharing stems across calls, ~20 new tokens each against 30 slots: every call evicts some of what
    # the previous ones cached, and later calls reuse what survived.
    stems = [fresh(8) for _ in range(3)]
    for i in range(6):
        same_as_big([stems[i % 3] + fresh(4), stems[i % 3] + fresh(3), stems[(i + 1) % 3] + fresh(5)])
    assert r.stats.trie.evicted_tokens > 0 and r.stats.reused_tokens > 0

    # A batch that needs every slot: all older branches go, none of the batch's own (``_in_use``).
    x, y, z = fresh(10), fresh(10), fresh(10)
    same_as_big([x, y, z])
    assert all(r.trie.cached_length(s) == 10 for s in (x, y, z))

    # Refused: planning ``a`` evicts y and takes its slots, ``b`` evicts z, then ``c`` finds nothing left to evict
    # (x, a and b are the batch's own). The refusal must leave the cache as it was, not ``a`` cached with
    # y's stale keys in its slots.
    a, b, c = x + fresh(5), fresh(12), fresh(12)
    before = (r.stats.trie.stored_tokens, r.stats.trie.evicted_tokens, r.trie.alloc.high_water,
              r.stats.computed_tokens, [r.trie.cached_length(s) for s in (x, y, z, a)])
    with pytest.raises(SaffronError, match="cannot hold this batch"):
        r.forward([a, b, c])
    after = (r.stats.trie.stored_tokens, r.stats.trie.evicted_tokens, r.trie.alloc.high_water,
             r.stats.computed_tokens, [r.trie.cached_length(s) for s in (x, y, z, a)])
    assert after == before
    same_as_big([a])  # computes a's 5 new tokens over x's cached keys
    same_as_big([y, a + [1]])  # y was evicted for a: recomputed beside it
    same_as_big([b, c])
