"""What every decoding method takes and returns: the models (``Stack``), the context a search runs in
(``RunContext``: session, stack, FLOP meter, generator, length limits) and the result.

Convention: the policy reads ``session.context_ids + output`` (prompt, attack prefill, generated output); reward
models and the MRM see only the generated output (the prefill is the attacker's and is never judged): reward
text = ``policy.decode(output)``, MRM input = ``mrm.rewards(session.prompt, [output, ...])``. A method's result
holds the new output only, without its EOS token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast

import torch

from saffron.errors import SaffronError
from saffron.guards.base import RewardModel
from saffron.methods.options import DEFAULT_MIN_NEW_TOKENS, MethodOptions
from saffron.methods.tree import Limits
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

    def reset(self) -> None:
        """Forget every runner's per-prompt cache (kept fixed prefixes stay), so a prompt's search depends on that
        prompt alone."""
        self.policy.reset()
        if self.reward is not None:
            self.reward.runner.reset()
        if self.mrm is not None:
            self.mrm.runner.reset()


@dataclass
class MethodResult:
    output_ids: tuple[int, ...]
    flops: dict[str, int]  # per model role: "policy", "reward", "mrm" (only the roles the method used)
    trace: dict[str, Any] = field(default_factory=dict)  # small JSON-serialisable summary of the search


OptionsT = TypeVar("OptionsT", bound=MethodOptions)


class Method(ABC, Generic[OptionsT]):
    """A decoding method (defence). Its options are one frozen dataclass (``options_type``, held as ``config``);
    ``Method(config)`` or, for Python callers, ``Method(name=value, ...)`` builds it through that dataclass."""

    name: ClassVar[str]
    options_type: ClassVar[type[MethodOptions]] = MethodOptions
    # The option that buys more search (samples, width, simulations): what `saffron compare` sweeps to match
    # compute. None for a method with no such knob.
    budget: ClassVar[str | None] = None
    # Models besides the policy that the method calls ("reward", "mrm"): the harness loads only these.
    uses: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: OptionsT | None = None, /, **given: Any) -> None:
        if config is None:
            config = cast(OptionsT, self.options_type.from_dict(given))
        elif given or not isinstance(config, self.options_type):
            raise TypeError(f"{type(self).__name__} takes one {self.options_type.__name__} or keyword options")
        self.config: OptionsT = config

    @classmethod
    def models_for(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The models besides the policy that a run with these options calls (default: ``uses``). A method
        whose options can leave one out overrides this, so the harness neither loads nor records it."""
        return cls.uses

    @abstractmethod
    def run(self, ctx: RunContext) -> MethodResult:
        """Continue ``ctx.session`` (prompt + prefill) and return the chosen output, its FLOPs read from
        ``ctx.meter``. Must be deterministic in the context's generator: the same seed gives the same tokens."""

    def search(self, session: Session, stack: Stack, seed: int) -> MethodResult:
        """Run on ``session`` with a context made ready here (the one place a search's context is made)."""
        return self.run(RunContext.create(self, session, stack, seed))

    def options(self) -> dict[str, Any]:
        """The options that define this method's results, defaults resolved (stored with every run to refuse
        mixing)."""
        return self.config.as_dict()


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


@dataclass(frozen=True)
class RunContext:
    """What a search runs with, made ready before it starts: the session, the models, a FLOP meter over the
    roles the method uses (started now, so counts spent earlier are not charged), the seeded generator and the
    length limits from the method's options."""

    session: Session
    stack: Stack
    meter: FlopMeter
    gen: torch.Generator
    limits: Limits

    @classmethod
    def create(cls, method: Method[Any], session: Session, stack: Stack, seed: int) -> RunContext:
        uses = type(method).models_for(method.options())
        # roles in the method's order: the flops dict a caller prints keeps the order it always had
        models: dict[str, _Counted | None] = {"reward": stack.reward, "mrm": stack.mrm}
        meter = FlopMeter(policy=stack.policy, **{role: models[role] for role in uses})
        cfg = method.config
        return cls(session=session, stack=stack, meter=meter, gen=torch.Generator().manual_seed(seed),
                   limits=Limits(stack.policy.model.eos_ids, cfg.min_new, cfg.max_new_tokens))

    @property
    def policy(self) -> Runner:
        return self.stack.policy

    def reward(self, method: str) -> RewardModel:
        """The search-time reward model; a one-line error naming ``method`` if the stack has none."""
        if self.stack.reward is None:
            raise SaffronError(f"method {method} needs a reward model: pass --reward GUARD (e.g. --reward smol-guard)")
        return self.stack.reward

    def mrm(self, method: str) -> Mrm:
        if self.stack.mrm is None:
            raise SaffronError(f"method {method} needs an MRM (multifurcation reward model): pass --mrm PATH")
        return self.stack.mrm


__all__ = ["DEFAULT_MIN_NEW_TOKENS", "FlopMeter", "Method", "MethodOptions", "MethodResult", "RunContext", "Stack"]
