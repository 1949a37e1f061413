"""Safety reward models and judges: real-valued reward for (prompt, response), > 0 safe, < 0 unsafe.

Load one by spec with ``saffron.guards.registry.load_guard``; this package's ``__init__`` imports only the base so
that the head PRM (``mrm/prm.py``), which the registry imports, can import the base without a cycle.
"""

from saffron.guards.base import RewardModel

__all__ = ["RewardModel"]
