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


def test_eviction_ties_go_to_the_lowest_slot_not_to_memory_addresses() -> None:
    for _ in range(20):  # with an ``id`` tie-break the victim changed from one allocation pattern to another
        t = RadixTrie(capacity=6)
        t.plan([[7, 8], [1, 2], [3, 4]])  # one batch: equal LRU clock and depth; slots 0-1, 2-3, 4-5
        p = t.plan([[5, 6]])
        assert p.chains[0].new == [0, 1] and t.cached_length([7, 8]) == 0
        assert t.cached_length([1, 2]) == 2 and t.cached_length([3, 4]) == 2


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


# One trie of 8 slots through a scripted life: what each step returns (a plan's new slots per chain, keep's length,
# or the error) and the sizes after it. Slot ids are exact: lowest free first, LRU leaves evicted first.
SCRIPT: list[tuple[str, object, object, int, int, int]] = [
    # op,      argument,                            result,                stored, evicted, available
    ("plan", [[1, 2, 3]], [[0, 1, 2]], 3, 0, 5),
    ("plan", [[1, 2, 4], [1, 2, 3, 5]], [[3], [4]], 5, 0, 3),  # [1, 2, 3] split after [1, 2]
    ("keep", [1, 2], 2, 5, 0, 3),
    ("plan", [[6, 7, 8]], [[5, 6, 7]], 8, 0, 0),
    ("plan", [[1, 2, 4, 9]], [[4]], 8, 1, 0),  # evicts the LRU leaf [5]; [4] is on the batch's own path
    ("plan", [[10, 11, 12, 13]], [[2, 5, 6, 7]], 8, 5, 0),  # evicts [3] (now a leaf), then [6, 7, 8]
    ("plan", [[1, 2, 20], [30, 31, 32, 33, 34, 35, 36]], "cannot hold", 8, 5, 0),  # rolled back: [9] survives
    ("cached", [1, 2, 4, 9], 4, 8, 5, 0),
    ("plan", [[1, 2, 4, 9]], [[4]], 8, 5, 0),  # fully cached: its last token runs again in its own slot
    ("clear", None, None, 2, 5, 6),  # only the kept [1, 2] (slots 0-1) is left
    ("plan", [[1, 2, 3], [40]], [[2], [3]], 4, 5, 4),
    ("plan", [[50, 51, 52, 53, 54, 55, 56]], "cannot hold", 4, 5, 4),  # 7 > 8 - 2 kept, even evicting all
    ("plan", [[50, 51, 52, 53, 54, 55]], [[2, 3, 4, 5, 6, 7]], 8, 7, 0),  # evicts [3] and [40], not [1, 2]
]


def test_sizes_after_each_step() -> None:
    t = RadixTrie(capacity=8)
    for step, (op, arg, want, stored, evicted, available) in enumerate(SCRIPT):
        got: object
        if op == "plan":
            try:
                got = [c.new for c in t.plan(arg).chains]  # type: ignore[arg-type]
            except SaffronError as e:
                got = "cannot hold" if "cannot hold this batch" in str(e) else str(e)
        elif op == "keep":
            got = t.keep(arg)  # type: ignore[arg-type]
        elif op == "cached":
            got = t.cached_length(arg)  # type: ignore[arg-type]
        else:
            t.clear()
            got = None
        assert got == want, f"step {step}: {op} {arg}"
        sizes = (t.stats.stored_tokens, t.stats.evicted_tokens, t.alloc.available)
        assert sizes == (stored, evicted, available), f"step {step}: {op} {arg}"
    assert t.stats.peak_stored_tokens <= 8
