"""The radix tree alone, no model (simulated mode): exact hits, slots, splits and eviction order."""

import pytest

from saffron.errors import SaffronError
from saffron.trie import RadixTrie


def test_shared_prefix_is_stored_once_and_split_on_divergence() -> None:
    t = RadixTrie(capacity=100)
    p = t.plan([[1, 2, 3, 4]])
    assert p.n_queries == 4 and p.chains[0].base == [] and p.out_rows == [3]
    p = t.plan([[1, 2, 9], [1, 2, 3, 4, 5]])
    # [1, 2] is reused by the first, [1, 2, 3, 4] by the second; [9] and [5] are new
    assert p.reused == [2, 4]
    assert [c.tokens for c in p.chains] == [[9], [5]]
    assert p.chains[0].base == [0, 1] and p.chains[1].base == [0, 1, 2, 3]
    assert t.stats.stored_tokens == 6
    root_child = t.root.children[1]
    assert root_child.tokens == [1, 2] and set(root_child.children) == {3, 9}  # the run was split after [1, 2]


def test_new_tokens_shared_inside_one_batch_run_once() -> None:
    t = RadixTrie(capacity=100)
    p = t.plan([[1, 2, 3], [1, 2, 3, 4], [1, 2]])
    assert p.n_queries == 4
    assert p.out_rows == [2, 3, 1]
    assert t.stats.recomputed_tokens == 0


def test_fully_cached_sequence_reruns_only_its_last_token() -> None:
    t = RadixTrie(capacity=100)
    t.plan([[1, 2, 3]])
    p = t.plan([[1, 2]])
    assert p.n_queries == 1 and p.chains[0].base == [0] and p.chains[0].new == [1]
    assert t.stats.recomputed_tokens == 1


def test_lru_leaves_are_evicted_first_and_pins_protect() -> None:
    t = RadixTrie(capacity=6)
    t.plan([[1, 2, 3]])  # slots 0-2
    t.plan([[1, 2, 4]])  # slot 3
    t.plan([[1, 2, 5]])  # slot 4
    t.pin([1, 2, 4])
    t.plan([[1, 2, 6, 7]])  # needs 2 slots, 1 free: evicts the oldest unpinned leaf, [3]
    assert t.cached_length([1, 2, 3]) == 2 and t.cached_length([1, 2, 4]) == 3
    assert t.stats.evicted_tokens == 1
    t.plan([[1, 2, 8]])  # next oldest unpinned leaf is [5]
    assert t.cached_length([1, 2, 5]) == 2 and t.cached_length([1, 2, 4]) == 3
    t.pin([1, 2, 4], -1)
    t.plan([[1, 2, 9]])
    assert t.cached_length([1, 2, 4]) == 2  # unpinned and now the oldest


def test_batch_larger_than_budget_is_refused() -> None:
    t = RadixTrie(capacity=4)
    with pytest.raises(SaffronError, match="cannot hold this batch"):
        t.plan([[1, 2, 3], [7, 8, 9]])


def test_clear_forgets_everything() -> None:
    t = RadixTrie(capacity=10)
    t.plan([[1, 2, 3]])
    t.clear()
    assert t.cached_length([1, 2, 3]) == 0 and t.stats.stored_tokens == 0
    assert t.plan([[1, 2, 3]]).chains[0].new == [0, 1, 2]  # slots are reused from the bottom


def test_kept_prefix_survives_clear_with_its_slots_and_is_never_evicted() -> None:
    t = RadixTrie(capacity=8)
    t.plan([[9, 9]])  # slots 0-1, then freed by clear
    t.plan([[1, 2, 3, 4]])  # slots 2-5
    assert t.keep([1, 2, 3]) == 3  # splits [1, 2, 3, 4] after 3; only the upper part is kept
    assert t.keep([1, 2, 3]) == 3 and t.kept_tokens == 3
    t.clear()
    assert t.cached_length([1, 2, 3, 4]) == 3 and t.cached_length([9, 9]) == 0
    assert t.stats.stored_tokens == 3
    p = t.plan([[1, 2, 3, 7, 8]])
    assert p.reused == [3] and p.chains[0].base == [2, 3, 4] and p.chains[0].new == [0, 1]  # freed slots first
    for i in range(10):  # LRU pressure: 5 free slots, 3-token leaves: every plan evicts, never the kept prefix
        t.plan([[50 + i, 60 + i, 70 + i]])
        assert t.cached_length([1, 2, 3]) == 3
    assert t.stats.evicted_tokens > 0
    with pytest.raises(SaffronError, match="cannot hold this batch"):
        t.plan([[40, 41, 42, 43, 44, 45]])  # 6 > 8 - 3 kept slots
