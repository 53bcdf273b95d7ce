"""Declared rewrite rules: pattern -> check -> replacement, each counting what fired and why it refused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import torch.fx as fx

from .base import PassContext

M = TypeVar("M")


@dataclass(frozen=True)
class RewriteRule(Generic[M]):
    """`pattern` finds a match at a node, `check` returns a reason to refuse (or None),
    `replacement` builds the new nodes and returns the node that takes the old one's place, or None
    when it refuses after all (the numerical guard: counted as refused.guard)."""

    name: str
    pattern: Callable[[fx.Node], M | None]
    check: Callable[[M, fx.GraphModule, PassContext], str | None]
    replacement: Callable[[M, fx.GraphModule, PassContext], fx.Node | None]


def apply_rules(gm: fx.GraphModule, ctx: PassContext, rules: list[RewriteRule[Any]], *, nodes=None) -> int:
    """Apply the first matching rule at each node; return how many rewrites happened."""
    fired = 0
    for node in list(nodes if nodes is not None else gm.graph.nodes):
        for rule in rules:
            match = rule.pattern(node)
            if match is None:
                continue
            reason = rule.check(match, gm, ctx)
            if reason is not None:
                ctx.counters[f"{rule.name}.refused.{reason}"] += 1
                continue
            new = rule.replacement(match, gm, ctx)
            if new is None:
                ctx.counters[f"{rule.name}.refused.guard"] += 1
                break
            new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta and k != "tngraph"})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            ctx.counters[f"{rule.name}.applied"] += 1
            fired += 1
            break
    return fired
