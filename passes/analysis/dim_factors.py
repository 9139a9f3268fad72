"""Factors: the units a dimension is made of (heads, head_dim, q/k/v sections, kv heads, GQA repeats).

A dimension is a row-major list of ``Factor``s whose sizes multiply to its size (size-1 dims: empty list).
A view that splits a factor refines it everywhere (``Factors.refine``); factors that must line up are united
into classes (union-find), and a class an op mixes along carries the reason. ``local_shape`` and
``shard_spec`` say what one rank holds when classes are split. Used by passes/analysis/dim_tracking.py.
"""

from __future__ import annotations

import math
from collections import deque

from galvatron_fx.errors import PlanError


class Factor:
    __slots__ = ("size", "children", "parent", "reason", "members")

    def __repr__(self) -> str:
        return f"Factor({self.size})"


class Factors:
    """Factors with refinement and union-find classes; a class's ``reason`` says why it cannot be cut."""

    def new(self, size: int) -> Factor:
        d = Factor()
        d.size, d.children, d.parent, d.reason, d.members = size, None, d, None, [d]
        return d

    def fresh(self, shape) -> list[list[Factor]]:
        return [[self.new(int(s))] if int(s) > 1 else [] for s in shape]

    def find(self, d: Factor) -> Factor:
        while d.parent is not d:
            d.parent = d.parent.parent
            d = d.parent
        return d

    def union(self, a: Factor, b: Factor) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            rb.parent = ra
            ra.members += rb.members
            ra.reason = ra.reason or rb.reason

    def refine(self, leaf: Factor, outer: int) -> list[Factor]:
        """Split ``leaf`` (and every factor of its class) into ``outer × size/outer``."""
        root = self.find(leaf)
        first = None
        for member in list(root.members):
            member.children = [self.new(outer), self.new(member.size // outer)]
            for child in member.children:
                child.reason = root.reason
            if first is None:
                first = member.children
            else:
                self.union(first[0], member.children[0])
                self.union(first[1], member.children[1])
        return leaf.children

    def leaves_of(self, items) -> list[Factor]:
        out: list[Factor] = []
        stack = list(reversed(list(items)))
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            elif item.children:
                stack.extend(reversed(item.children))
            else:
                out.append(item)
        return out

    def forbid(self, dims, reason: str) -> None:
        for leaf in self.leaves_of(dims):
            root = self.find(leaf)
            root.reason = root.reason or reason

    def unify(self, a: list[Factor], b: list[Factor]) -> bool:
        """Make two equal-sized dims line up factor by factor (refining where boundaries differ)."""
        xs, ys = deque(self.leaves_of(a)), deque(self.leaves_of(b))
        while xs and ys:
            x, y = xs.popleft(), ys.popleft()
            if x.children or y.children:
                (xs if x.children else ys).extendleft(reversed(self.leaves_of([x if x.children else y])))
                (ys if x.children else xs).appendleft(y if x.children else x)
                continue
            if x.size == y.size:
                self.union(x, y)
            elif x.size % y.size == 0:
                head, tail = self.refine(x, y.size)
                self.union(head, y)
                xs.appendleft(tail)
            elif y.size % x.size == 0:
                head, tail = self.refine(y, x.size)
                self.union(head, x)
                ys.appendleft(tail)
            else:
                return False
        return not xs and not ys

    def regroup(self, dims, shape) -> list[list[Factor]] | None:
        """The factors of a reshape's output dims (``None`` when a boundary falls inside an indivisible factor)."""
        queue = deque(self.leaves_of(dims))
        out = []
        for n in (int(s) for s in shape):
            taken, product = [], 1
            while product < n:
                if not queue:
                    return None
                leaf = queue.popleft()
                if leaf.children:
                    queue.extendleft(reversed(self.leaves_of([leaf])))
                    continue
                need = n // product
                if n % product:
                    return None
                if need % leaf.size == 0:
                    taken.append(leaf)
                    product *= leaf.size
                elif leaf.size % need == 0:
                    head, tail = self.refine(leaf, need)
                    taken.append(head)
                    product *= need
                    queue.appendleft(tail)
                else:
                    return None
            out.append(taken)
        return out if not queue else None


def local_shape(factors: Factors, dims, picks: dict) -> list[int]:
    """Sizes of ``dims`` on one rank when each picked class is split ``picks[class]`` ways."""
    return [math.prod(leaf.size // picks.get(factors.find(leaf), 1) for leaf in factors.leaves_of(d)) for d in dims]


def shard_spec(factors: Factors, leaves, picks: dict, indices: dict):
    """``(factor sizes, picks)`` of one dim for the rank with class ``indices`` (see collectives.select_local)."""
    sizes, chosen = [], []
    for leaf in leaves:
        cls = factors.find(leaf)
        sizes.append(leaf.size)
        if cls in picks:
            length = leaf.size // picks[cls]
            chosen.append((indices[cls] * length, length))
        else:
            chosen.append(None)
    return tuple(sizes), tuple(chosen)


def rewrite_sizes(sizes, local: list[int], full: list[int]) -> list:
    """The size argument of a view or expand whose dims shrink from ``full`` to ``local``: constants become the
    local sizes, ``-1`` stays, and a size read from a tensor (an ``fx.Node``: the batch) stays where its dim keeps
    its size, else becomes ``-1`` when that is the only inferred dim. PlanError when none of that fits."""
    out = [-1 if s == -1 else s if not isinstance(s, int) else n for s, n in zip(sizes, local)]
    changed = [i for i, s in enumerate(sizes) if not isinstance(s, int) and local[i] != full[i]]
    if changed:
        if len(changed) > 1 or -1 in out:
            raise PlanError(
                f"a view's sizes {list(sizes)}, read from tensors, would have to shrink in dims {changed}",
                "use tp=1 (or sp='none') for this layer",
            )
        out[changed[0]] = -1
    return out
