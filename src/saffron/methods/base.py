"""What every decoding method takes and returns, and the checks every method shares.

Convention: the policy reads ``session.context_ids + output`` (prompt, attack prefill, generated output); reward
models and the MRM see only the generated output (the prefill is the attacker's and is never judged): reward
text = ``policy.decode(output)``, MRM input = ``mrm.rewards(session.prompt, [output, ...])``. A method's result
holds the new output only, without its EOS token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from saffron.errors import SaffronError
from saffron.guards.base import RewardModel
from saffron.runner import Runner
from saffron.session import Session

if TYPE_CHECKING:
    from saffron.mrm.base import Mrm


@dataclass
class Stack:
    """The runner-backed models a method may use. ``reward`` is the search-time reward model (absent for the
    undefended policy); ``mrm`` the multifurcation reward model (Saffron only). The final judge is not part of
    a method and is never charged to it."""

    policy: Runner
    reward: RewardModel | None = None
    mrm: Mrm | None = None


@dataclass
class MethodResult:
    output_ids: tuple[int, ...]
    flops: dict[str, int]  # per model role: "policy", "reward", "mrm" (only the roles the method used)
    trace: dict[str, Any] = field(default_factory=dict)  # small JSON-serialisable summary of the search


class Method(ABC):
    name: ClassVar[str]
    # The option that buys more search (samples, width, simulations): what `saffron compare` sweeps to match
    # compute. None for a method with no such knob.
    budget: ClassVar[str | None] = None
    # Models besides the policy that the method calls ("reward", "mrm"): the harness loads only these.
    uses: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def models_for(cls, options: dict[str, Any]) -> tuple[str, ...]:
        """The models besides the policy that a run with these options calls (default: ``uses``). A method
        whose options can leave one out overrides this, so the harness neither loads nor records it."""
        return cls.uses

    @abstractmethod
    def run(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        """Continue ``session`` (prompt + prefill) and return the chosen output. Must be deterministic in
        ``seed``: the same seed gives the same tokens."""

    def options(self) -> dict[str, Any]:
        """The options that define this method's results (stored with every run to refuse mixing)."""
        return {}


class _Counted(Protocol):
    @property
    def flops(self) -> int: ...


class FlopMeter:
    """FLOPs spent per role since construction: each role's count is the delta of its model's ``.flops``."""

    def __init__(self, **roles: _Counted | None) -> None:
        self.roles = {k: v for k, v in roles.items() if v is not None}
        self.start = {k: v.flops for k, v in self.roles.items()}

    def delta(self) -> dict[str, int]:
        return {k: v.flops - self.start[k] for k, v in self.roles.items()}


def require_reward(stack: Stack, method: str) -> RewardModel:
    if stack.reward is None:
        raise SaffronError(f"method {method} needs a reward model: pass --reward GUARD (e.g. --reward smol-guard)")
    return stack.reward


def require_mrm(stack: Stack, method: str) -> Mrm:
    if stack.mrm is None:
        raise SaffronError(f"method {method} needs an MRM (multifurcation reward model): pass --mrm PATH")
    return stack.mrm


def check_int(name: str, value: Any, lo: int = 1) -> int:
    """An integer option that must be >= ``lo`` (bools and floats refused, so 2.5 children cannot slip in)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SaffronError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise SaffronError(f"{name} must be >= {lo}, got {value}")
    return value


# Every method's EOS ban: no method may stop before this many new tokens unless asked to. One figure for all, so
# that no method wins (or loses) a comparison by answering shorter; 16 is the paper's (min_new_tokens of its code).
DEFAULT_MIN_NEW_TOKENS = 16


def check_lengths(max_new_tokens: Any, min_new_tokens: Any) -> int:
    """Check the length options and return ``min_new_tokens``; ``None`` (every method's default) is
    ``DEFAULT_MIN_NEW_TOKENS`` cut to ``max_new_tokens``, so a short answer asked for is not refused."""
    check_int("max_new_tokens", max_new_tokens)
    if min_new_tokens is None:
        return min(DEFAULT_MIN_NEW_TOKENS, max_new_tokens)
    check_int("min_new_tokens", min_new_tokens, lo=0)
    if min_new_tokens > max_new_tokens:
        raise SaffronError(f"min_new_tokens ({min_new_tokens}) must be <= max_new_tokens ({max_new_tokens})")
    return int(min_new_tokens)


def check_float(name: str, value: Any, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lo:
        raise SaffronError(f"{name} must be a number >= {lo}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    if value not in choices:
        raise SaffronError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)
