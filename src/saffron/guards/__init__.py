"""Safety reward models and judges: real-valued reward for (prompt, response), > 0 safe, < 0 unsafe."""

from saffron.guards.base import RewardModel, load_guard

__all__ = ["RewardModel", "load_guard"]
