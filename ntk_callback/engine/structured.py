"""Structured per-layer rules (placeholder-free minimal dispatch: no rule registered yet).

``plan`` decides which parameters a structured rule computes; ``compute`` returns their
kernel contributions by layer key. With no rules every parameter takes the generic path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .problem import Problem


@dataclass
class Plan:
    handled: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.handled)


def plan(problem: Problem, implementation: str) -> Plan:
    return Plan()


def compute(problem: Problem, plan: Plan, keys: dict[str, list[str]],
            budget: int) -> dict[str, torch.Tensor]:
    return {}
