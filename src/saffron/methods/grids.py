"""One tuning grid per method: the configurations the lead runs on the ``dev`` split before any comparison.

Every searching method gets the same number of configurations (``GRID_SIZE``), Saffron included, so no method is
better tuned than another; the winner per method is chosen on ``dev`` only and then compared on ``test``. A grid
never sets the budget (``width``, ``n``, ``simulations``: ``saffron compare`` sweeps it to the matched compute) nor
the lengths (one ``min_new_tokens``/``max_new_tokens`` for every method). ``none`` is not tuned: it is the
undefended policy, greedy, the reference every defence is measured against.
"""

from __future__ import annotations

from typing import Any

GRID_SIZE = 4

TUNING_GRIDS: dict[str, list[dict[str, Any]]] = {
    # sampling temperature and nucleus: the paper does not give Best-of-N's; 0.7/0.9 is ours, 1.0/1.0 is plain
    # sampling from the policy
    "best-of-n": [
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 1.0, "top_p": 1.0},
        {"temperature": 1.0, "top_p": 0.9},
        {"temperature": 0.5, "top_p": 0.95},
    ],
    "rejection": [
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 1.0, "top_p": 1.0},
        {"temperature": 1.0, "top_p": 0.9},
        {"temperature": 0.5, "top_p": 0.95},
    ],
    # the paper's PRM beam search (2 and 4 children, its Table 1) and REBASE's balanced expansion at two
    # temperatures (reward units: the guards' log-odds, a few units wide)
    "rebase": [
        {"expansion": "beam", "children": 2},
        {"expansion": "beam", "children": 4},
        {"expansion": "balanced", "balance_temperature": 1.0},
        {"expansion": "balanced", "balance_temperature": 0.3},
    ],
    # DeAL: the lookahead the paper's Table 1 tried (0 and 2), a longer one, and a wider exploration constant
    "deal-mcts": [
        {"lookahead": 0, "c": 1.0},
        {"lookahead": 2, "c": 1.0},
        {"lookahead": 4, "c": 1.0},
        {"lookahead": 2, "c": 3.0},
    ],
    # the paper's search (as --preset paper), our default, the default without a reward-model call at the end,
    # and parallel lineages pushed apart
    "saffron": [
        {"no_repeat_ngram": 0, "per_parent": 0, "policy_weight": 0.0, "diversity": 0.0, "final": "first"},
        {},
        {"final": "mrm"},
        {"per_parent": 1, "diversity": 1.0},
    ],
}
