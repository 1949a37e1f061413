"""No defence: the policy continues the attacked conversation on its own (greedy or sampled).

Options: ``NoDefenceOptions`` (the shared lengths, so the undefended row answers at the same length as the
defences, plus ``temperature`` and ``top_p``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saffron.methods.base import Method, MethodResult, RunContext
from saffron.methods.options import MethodOptions
from saffron.methods.tree import extend


@dataclass(frozen=True, kw_only=True)
class NoDefenceOptions(MethodOptions):
    method = "none"

    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus mass in (0, 1] (sampling only)."})

    def check(self) -> None:
        self.check_sampling(self.temperature, self.top_p)


class NoDefence(Method[NoDefenceOptions]):
    name = "none"
    options_type = NoDefenceOptions

    def run(self, ctx: RunContext) -> MethodResult:
        o = self.config
        # the same length rules and rollout as every other method (ctx.limits, tree.extend): one row
        out = extend(ctx.policy, ctx.session.context_ids, [()], o.max_new_tokens, ctx.limits, o.temperature, o.top_p,
                     ctx.gen)[0]
        return MethodResult(output_ids=out.tokens, flops=ctx.meter.delta())
