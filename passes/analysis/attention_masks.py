"""Attention masks that say nothing the kernel cannot know: causal masks become ``is_causal=True``, masks that
keep every position are dropped.

Hugging Face decoders build an explicit ``(batch, 1, seq, seq)`` mask and pass it to
``scaled_dot_product_attention`` as ``attn_mask``; on GPUs that rules out the flash kernel, and the mask
would cross every pipeline cut. Where a mask depends on no data (only on sizes, buffers and constants: no
padding from the batch) it is computed here, at two batch sizes, and compared with the causal pattern
``key <= query`` (and with "keep all"); a mask that matches, with as many queries as keys, is replaced by
``is_causal=True`` (or by no mask), and its computation, now unused, is removed. A mask built from the
batch's attention mask (padding) depends on data and is left as it is, and so is one that reads a buffer
of a model built on the meta device (its values are not known here).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from galvatron_fx.fx_utils import get_attr_path
from galvatron_fx.passes.analysis.local_values import Rebuildable
from galvatron_fx.program import node_meta

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_MASK, _DROPOUT, _CAUSAL = 3, 4, 5  # positions in scaled_dot_product_attention's schema


def _data_free(node: fx.Node, rebuildable: Rebuildable, seen: dict) -> bool:
    """Rebuildable and reading no placeholder's values (only their sizes, through ``sym_size``)."""
    if node not in seen:
        if node.op == "placeholder":
            seen[node] = False
        elif node.op == "call_function" and node.target is aten.sym_size.int:
            seen[node] = True
        else:
            seen[node] = rebuildable(node) and all(_data_free(a, rebuildable, seen) for a in node.all_input_nodes)
    return seen[node]


class _Unknown(Exception):
    """A value the mask reads is not known here (a buffer of a model built on the meta device)."""


def _evaluate(gm: fx.GraphModule, value: fx.Node, batch: int) -> torch.Tensor:
    """``value`` computed on the CPU with every batched placeholder at ``batch`` samples (zeros: only sizes
    matter). Raises ``_Unknown`` when it reads a meta tensor."""
    env: dict[fx.Node, object] = {}

    def run(node: fx.Node):
        if node in env:
            return env[node]
        if node.op == "placeholder":
            fake = node.meta["val"]
            shape = (batch, *fake.shape[1:]) if node_meta(node).batched else tuple(fake.shape)
            env[node] = torch.zeros(shape, dtype=fake.dtype)
        elif node.op == "get_attr":
            env[node] = get_attr_path(gm, node.target)
            if isinstance(env[node], torch.Tensor) and env[node].is_meta:
                raise _Unknown(node.target)
        else:
            args = fx.node.map_arg(node.args, run)
            kwargs = fx.node.map_arg(node.kwargs, run)
            kwargs = {k: torch.device("cpu") if isinstance(v, torch.device) else v for k, v in kwargs.items()}
            env[node] = node.target(*args, **kwargs)
        return env[node]

    with torch.device("cpu"):  # a model may be captured under torch.device("meta")
        return run(value)


def _keeps(mask: torch.Tensor) -> torch.Tensor:
    """Which query/key pairs a boolean or additive mask keeps."""
    return mask if mask.dtype == torch.bool else mask == 0


def _pattern(mask: torch.Tensor, queries: int, keys: int) -> str | None:
    keeps = _keeps(mask).expand(*mask.shape[:-2], queries, keys)
    if bool(keeps.all()):
        return "all"
    causal = torch.ones(queries, keys, dtype=torch.bool, device=keeps.device).tril()
    if queries == keys and bool((keeps == causal).all()):
        return "causal"
    return None


def simplify_attention_masks(gm: fx.GraphModule, batch_sizes: tuple[int, ...]) -> int:
    """Requires: concrete ``meta["val"]``, batched placeholders marked. Ensures: every attention whose mask is
    causal or keeps everything (at each of ``batch_sizes``, see the module docstring) runs without one, causal
    ones with ``is_causal=True``. Returns how many were simplified."""
    rebuildable, seen, done = Rebuildable(gm), {}, 0
    for node in list(gm.graph.find_nodes(op="call_function", target=SDPA)):
        args = list(node.args) + [None, 0.0, False][len(node.args) - 3 :]
        mask = node.kwargs.get("attn_mask", args[_MASK])
        if (
            not isinstance(mask, fx.Node)
            or not _data_free(mask, rebuildable, seen)
            or node.kwargs.get("is_causal", args[_CAUSAL])
        ):
            continue
        queries, keys = node.args[0].meta["val"].shape[-2], node.args[1].meta["val"].shape[-2]
        try:
            patterns = {_pattern(_evaluate(gm, mask, batch), queries, keys) for batch in batch_sizes}
        except _Unknown:  # kept: correct, if slower
            continue
        if len(patterns) != 1 or None in patterns:
            continue
        args[_MASK], args[_CAUSAL] = None, patterns == {"causal"}
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "is_causal")}
        done += 1
    if done:
        gm.graph.eliminate_dead_code()  # the masks' computations
        gm.recompile()
    return done
