"""Following dimensions through an ATen layer graph: which "factors" (units such as heads, head_dim, q/k/v
sections, kv heads, GQA repeats; passes/dim_factors.py) every dimension of every value is made of, which
factors must line up across tensors, and which ones an op mixes (so they cannot be cut).

A view that splits a factor refines it everywhere (``Factors.refine``); ops whose operands must match
(elementwise, attention q/k/v, matmul batch dims) unite factors into classes (union-find); ops that mix
along a factor (contractions, softmax, norms, picking sections) mark its class with a reason.

``analyze`` also finds projections with a parameter weight: *roots* (input replicated) start a tainted
region, *sinks* (input tainted) end it. Used by tensor parallelism; the machinery knows nothing of ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import get_attr_path
from galvatron_fx.passes.analysis.dim_factors import Factor, Factors

aten = torch.ops.aten


# -- analysis ----------------------------------------------------------------------------------------------
@dataclass
class RootInfo:
    weight: fx.Node
    bias: fx.Node | None
    weight_out_dim: int
    out_factor: Factor


@dataclass
class SinkInfo:
    weight: fx.Node
    bias: fx.Node | None
    weight_in_dim: int
    contraction: list[Factor]
    roots: frozenset


@dataclass
class Analysis:
    factors: Factors
    dims: dict = field(default_factory=dict)  # node → list of dims (tuple outputs: list of those)
    taint: dict = field(default_factory=dict)  # node → frozenset of roots it derives from
    roots: dict = field(default_factory=dict)
    sinks: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)  # (roots, reason)
    obstacles: dict = field(default_factory=dict)  # component → first reason

    def components(self) -> list[frozenset]:
        parent = {r: r for r in self.roots}

        def find(r):
            while parent[r] is not r:
                r = parent[r]
            return r

        groups = [s for s in self.taint.values() if len(s) > 1] + [s.roots for s in self.sinks.values()]
        for group in groups:
            first, *rest = list(group)
            for other in rest:
                a, b = find(first), find(other)
                if a is not b:
                    parent[b] = a
        members: dict = {}
        for r in self.roots:
            members.setdefault(find(r), set()).add(r)
        comps = [frozenset(m) for m in members.values()]
        for roots, reason in self.problems:
            for comp in comps:
                if roots & comp:
                    self.obstacles.setdefault(comp, reason)
        return comps


def param_matmul(gm: fx.GraphModule, node: fx.Node):
    """``(x, weight, bias, weight_in_dim, weight_out_dim)`` when ``node`` projects by a 2-D parameter."""
    args, t = node.args, node.target
    if t is aten.linear.default:
        x, w, b, w_in, w_out = args[0], args[1], (args[2] if len(args) > 2 else node.kwargs.get("bias")), 1, 0
    elif t is aten.addmm.default and not node.kwargs:
        b, x, w, w_in, w_out = args[0], args[1], args[2], 0, 1
    elif t in (aten.mm.default, aten.matmul.default):
        x, w, b, w_in, w_out = args[0], args[1], None, 0, 1
    else:
        return None
    for p in (w, b):
        if p is not None and not (
            isinstance(p, fx.Node) and p.op == "get_attr" and isinstance(get_attr_path(gm, p.target), nn.Parameter)
        ):
            return None
    if get_attr_path(gm, w.target).dim() != 2:
        return None
    return x, w, b, w_in, w_out


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node):
    value = _val(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class Unsupported(Exception):
    pass


POINTWISE_EXTRA = {
    aten.dropout.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.lift_fresh_copy.default,
    aten.detach.default,
    aten.type_as.default,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# ops autocast runs in its lower precision, casting every floating input (bias included), and the views between
AUTOCAST_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default, aten.linear.default}
PASS_THROUGH = VIEWS | {aten.t.default, aten.transpose.int, aten.permute.default, aten.expand.default}


def feeds_only_matmuls(node: fx.Node) -> bool:
    """Whether only matrix multiplications read ``node`` (through views and transposes): what autocast would
    cast to its dtype anyway, so it can be gathered in that dtype (the lowering's ``sp_gather``, ``grid_param``)."""
    users = list(node.users)
    return bool(users) and all(
        user.target in AUTOCAST_MATMULS or (user.target in PASS_THROUGH and feeds_only_matmuls(user)) for user in users
    )


def _tensor_args(node):
    return [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]


def _transfer(D: Factors, node: fx.Node, dims: dict, tainted) -> object:
    """Factors of ``node``'s output; unites and forbids along the way. Raises Unsupported."""
    t, args = node.target, node.args
    out_shape = _shape(node)
    get = lambda n: dims[n]  # noqa: E731
    if t is aten._assert_tensor_metadata.default:
        return None
    if (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags) or t in POINTWISE_EXTRA:
        operands = [a for a in _tensor_args(node) if a in dims]
        out = []
        for j in range(1, len(out_shape) + 1):
            present = [a for a in operands if len(_shape(a)) >= j and _shape(a)[-j] > 1]
            for other in present[1:]:
                if not D.unify(get(present[0])[-j], get(other)[-j]):
                    raise Unsupported("elementwise operands do not line up")
            chosen = next((a for a in present if tainted(a)), present[0] if present else None)
            out.append(get(chosen)[-j] if chosen is not None else ([D.new(out_shape[-j])] if out_shape[-j] > 1 else []))
        return list(reversed(out))
    x = args[0] if args else None
    if t is aten.linear.default:  # a projection left replicated
        return [*get(x)[:-1], *D.fresh(out_shape[-1:])]
    if t is aten.addmm.default:
        return [*get(args[1])[:-1], *D.fresh(out_shape[-1:])]
    if t in VIEWS:
        out = get(x) if _shape(x) == out_shape else D.regroup(get(x), out_shape)
        if out is None:
            raise Unsupported(f"view {list(_shape(x))} → {list(out_shape)} splits a unit")
        return out
    if t is aten.expand.default:
        xs, xd = _shape(x), get(x)
        lead = len(out_shape) - len(xs)
        out = D.fresh(out_shape[:lead])
        for i, n in enumerate(out_shape[lead:]):
            out.append(xd[i] if xs[i] == n else D.fresh([n])[0])
        return out
    if t is aten.roll.default:  # moves elements along the rolled dims only
        D.forbid([get(x)[d % len(out_shape)] for d in args[2]], "rolled")
        return list(get(x))
    if t in (aten.pad.default, aten.constant_pad_nd.default):
        out = list(get(x))
        for i in range(len(args[1]) // 2):  # pad pairs run from the last dim backwards
            d = len(out_shape) - 1 - i
            if args[1][2 * i] or args[1][2 * i + 1]:
                D.forbid(out[d], "padded")
                out[d] = D.fresh([out_shape[d]])[0]
        return out
    if t is aten.unsqueeze.default:
        out = list(get(x))
        out.insert(args[1] % (len(out) + 1), [])
        return out
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        xs = _shape(x)
        which = [args[1]] if t is aten.squeeze.dim else (list(args[1]) if t is aten.squeeze.dims else range(len(xs)))
        drop = {w % len(xs) for w in which if xs[w % len(xs)] == 1}
        return [d for i, d in enumerate(get(x)) if i not in drop]
    if t is aten.transpose.int:
        out, a, b = list(get(x)), args[1] % len(out_shape), args[2] % len(out_shape)
        out[a], out[b] = out[b], out[a]
        return out
    if t is aten.permute.default:
        return [get(x)[p % len(out_shape)] for p in args[1]]
    if t is aten.t.default:
        return list(reversed(get(x)))
    if t in (aten.split.Tensor, aten.split_with_sizes.default):
        dim = (args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) % len(_shape(x))
        n = _shape(x)[dim]
        sizes = (
            [args[1]] * (n // args[1])
            if t is aten.split.Tensor and n % args[1] == 0
            else list(args[1])
            if t is aten.split_with_sizes.default
            else None
        )
        if not sizes or len(set(sizes)) != 1:
            raise Unsupported("split into unequal parts")
        groups = D.regroup([get(x)[dim]], [len(sizes), sizes[0]])
        if groups is None:
            raise Unsupported("split boundaries fall inside a unit")
        D.forbid(groups[0], "sections picked by split")
        return [[*get(x)[:dim], groups[1], *get(x)[dim + 1 :]] for _ in sizes]
    if t is aten.slice.Tensor:
        dim = (args[1] if len(args) > 1 else 0) % len(out_shape)
        if _shape(x)[dim] == out_shape[dim]:
            return list(get(x))
        D.forbid(get(x)[dim], "sliced")
        out = list(get(x))
        out[dim] = D.fresh([out_shape[dim]])[0]
        return out
    if t is aten.select.int:
        dim = args[1] % len(_shape(x))
        D.forbid(get(x)[dim], "indexed")
        return [d for i, d in enumerate(get(x)) if i != dim]
    if t is aten.cat.default:
        parts = [p for p in args[0] if _shape(p) and math.prod(_shape(p)) > 0]
        dim = (args[1] if len(args) > 1 else 0) % len(out_shape)
        out = []
        for j in range(len(out_shape)):
            if j == dim:
                for p in parts:
                    D.forbid(get(p)[dim], "concatenated along")
                out.append(D.fresh([out_shape[j]])[0])
                continue
            for p in parts[1:]:
                if not D.unify(get(parts[0])[j], get(p)[j]):
                    raise Unsupported("concatenated tensors do not line up")
            out.append(get(next((p for p in parts if tainted(p)), parts[0]))[j])
        return out
    if t is aten.scaled_dot_product_attention.default:
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        if (len(args) > 7 and args[7]) or node.kwargs.get("enable_gqa"):
            raise Unsupported("attention with enable_gqa")
        qd, kd, vd = get(q), get(k), get(v)
        batch = len(qd) - 2
        for other, shape in ((kd, _shape(k)), (vd, _shape(v))):
            for j in range(1, batch + 1):
                if len(other) - 2 >= j and _shape(q)[-2 - j] > 1 and shape[-2 - j] > 1:
                    if not D.unify(qd[-2 - j], other[-2 - j]):
                        raise Unsupported("attention heads of q, k, v do not line up")
        if isinstance(mask, fx.Node) and mask in dims:
            md, ms = get(mask), _shape(mask)
            for j in range(1, min(batch, len(md) - 2) + 1):
                if ms[-2 - j] > 1 and _shape(q)[-2 - j] > 1 and not D.unify(qd[-2 - j], md[-2 - j]):
                    raise Unsupported("attention mask does not line up with heads")
        D.forbid([qd[-1], kd[-1]], "attention contracts head_dim")
        D.forbid([kd[-2], vd[-2]], "attention sums over keys")
        return [*qd[:-2], qd[-2], vd[-1]]
    if t in (aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int):
        D.forbid(get(x)[args[1] % len(out_shape)], "softmax")
        return list(get(x))
    if t in (aten.layer_norm.default, aten.native_layer_norm.default):
        k = len(args[1])
        D.forbid(get(x)[-k:], "normalised by a norm")
        if t is aten.layer_norm.default:
            return list(get(x))
        return [list(get(x)), D.fresh(_shape_item(node, 1)), D.fresh(_shape_item(node, 2))]
    if t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default):
        xs = _shape(x)
        reduced = {d % len(xs) for d in (args[1] if len(args) > 1 and args[1] is not None else range(len(xs)))}
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        D.forbid([get(x)[d] for d in reduced], "reduced over")
        return [([] if i in reduced else d) for i, d in enumerate(get(x)) if keep or i not in reduced]
    if t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
        a, b = args[0], args[1]
        ad, bd = get(a), get(b)
        if len(ad) < 2 or len(bd) < 2:
            raise Unsupported("matmul of vectors")
        batch = []
        for j in range(1, len(out_shape) - 1):
            present = [(d, s) for d, s in ((ad, _shape(a)), (bd, _shape(b))) if len(d) - 2 >= j and s[-2 - j] > 1]
            if len(present) == 2 and not D.unify(present[0][0][-2 - j], present[1][0][-2 - j]):
                raise Unsupported("matmul batch dims do not line up")
            batch.append(present[0][0][-2 - j] if present else [])
        D.forbid([ad[-1], bd[-2]], "contracted by a matmul")
        return [*reversed(batch), ad[-2], bd[-1]]
    if t is aten.embedding.default:
        return [*get(args[1]), get(args[0])[1]]
    if t is aten.index.Tensor and len(args[1]) == 1 and isinstance(args[1][0], fx.Node):
        return [*get(args[1][0]), *get(x)[1:]]
    raise Unsupported(f"{node.name} ({t}) is not understood on sharded values")


def _shape_item(node, i):
    return tuple(node.meta["val"][i].shape)


def analyze(gm: fx.GraphModule, excluded=frozenset()) -> Analysis:
    """Factors, taint, roots and sinks of ``gm``; projections in ``excluded`` are not roots."""
    D = Factors()
    an = Analysis(D)
    dims, taint = an.dims, an.taint
    tainted = lambda n: bool(taint.get(n))  # noqa: E731
    for node in gm.graph.nodes:
        if node.op == "output":
            for arg in node.all_input_nodes:
                if tainted(arg):
                    an.problems.append((taint[arg], f"{arg.name} leaves the layer while sharded"))
            continue
        value = node.meta.get("val")
        if node.op == "get_attr":
            value = get_attr_path(gm, node.target)
        inputs = node.all_input_nodes
        taint[node] = frozenset().union(*(taint.get(a, frozenset()) for a in inputs)) if inputs else frozenset()
        if node.op in ("placeholder", "get_attr"):
            if isinstance(value, torch.Tensor):
                dims[node] = D.fresh(value.shape)
            continue
        if (
            node.target is __import__("operator").getitem
            and isinstance(dims.get(node.args[0]), list)
            and isinstance(_val(node.args[0]), (tuple, list))
        ):
            dims[node] = dims[node.args[0]][node.args[1]]
            continue
        matmul = param_matmul(gm, node) if node.op == "call_function" else None
        if matmul is not None and node not in excluded:
            x, w, b, w_in, w_out = matmul
            xd = dims[x]
            if not tainted(x):
                factor = D.new(int(_shape(w)[w_out] if _shape(w) else get_attr_path(gm, w.target).shape[w_out]))
                an.roots[node] = RootInfo(w, b, w_out, factor)
                dims[node] = [*xd[:-1], [factor]]
                taint[node] = frozenset({node})
            else:
                an.sinks[node] = SinkInfo(w, b, w_in, list(xd[-1]), taint[x])
                dims[node] = [*xd[:-1], *D.fresh(_shape(node)[-1:])]
                taint[node] = frozenset()
            continue
        if matmul is not None:  # excluded: stays replicated
            taint[node] = frozenset()
        try:
            if any(a not in dims for a in _tensor_args(node)):
                raise Unsupported(f"{node.name} reads a value whose dims are unknown")
            out = _transfer(D, node, dims, tainted)
        except (Unsupported, TypeError, IndexError, KeyError, ValueError) as error:
            if tainted(node):
                reason = (
                    str(error)
                    if isinstance(error, Unsupported)
                    else f"{node.name} ({node.target}) is not understood on sharded values"
                )
                an.problems.append((taint[node], reason))
            out = _fresh_like(D, value)
        if out is not None:
            dims[node] = out
    return an


def _fresh_like(D: Factors, value):
    if isinstance(value, torch.Tensor):
        return D.fresh(value.shape)
    if isinstance(value, (tuple, list)):
        return [D.fresh(v.shape) if isinstance(v, torch.Tensor) else None for v in value]
    return None


def rewritten_meta(gm: fx.GraphModule, what: str, remedy: str) -> None:
    """``refresh_meta`` after a rewrite: a shape that no longer fits is a PlanError naming ``what`` was done (and
    not also a traceback that the fake-tensor logger would print)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        refresh_meta(gm)
    except Exception as error:  # fake propagation raises whatever the op raises
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise PlanError(
            f"{what}: the rewritten graph does not fit ({type(error).__name__}: {lines[0][:200] if lines else ''})",
            remedy,
        ) from None
    finally:
        logger.setLevel(level)


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` of every node with fake tensors (checks that the rewritten shapes fit).

    Parameters and buffers enter as fakes made from their shape: fakifying the real ones would leave weak
    references to them in the fake mode's memo, and a module holding such tensors cannot be moved with
    ``swap_tensors`` later (materialising a meta model does that)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = []
    tensors = (*gm.parameters(), *gm.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")  # meta for a model built on meta
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        inputs.append(
            _fake(mode, value.shape, value.stride(), value.dtype, device) if isinstance(value, torch.Tensor) else value
        )
    _ShapeOnlyProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def _fake(mode: FakeTensorMode, shape, stride, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with mode:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)


class _ShapeOnlyProp(FakeTensorProp):
    """Fake-tensor propagation that never fakifies the module's own tensors (see ``refresh_meta``)."""

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        if not isinstance(value, torch.Tensor):
            return value
        fake = _fake(self._mode, value.shape, value.stride(), value.dtype, value.device)
        return fake.requires_grad_(value.requires_grad) if value.requires_grad else fake
