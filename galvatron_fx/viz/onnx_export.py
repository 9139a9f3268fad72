"""An ONNX file of a LayerGraph, for Netron: one custom-domain node per layer, per collective, per
redistribution and per pipeline send/recv, wired by the activations the layers pass each other.

Nodes are in the ``ai.galvatron_fx`` domain (no kernels: the file describes a plan, it does not run).
A layer node's attributes carry its kind, type, module path, stage, strategy fields, FLOPs, bytes and
predicted time and memory; a collective node (op type ``AllReduce``, ``AllGather``, ``ReduceScatter``,
``AllToAll``) hangs off its layer's first output with its group, phase, count and bytes. Redistribution and
send/recv nodes sit on the data path: the tensors they move are renamed after them (``name@L3``,
``name@stage1``), so the graph shows where each layer's inputs come from. Shapes are per micro-batch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from galvatron_fx.program import Program

from .collectives import Collective
from .model import LayerGraph, LayerNode

DOMAIN = "ai.galvatron_fx"
OPSET = 17
_DTYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.bool: TensorProto.BOOL,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
}
_OP_TYPES = {
    "all_reduce": "AllReduce",
    "all_gather": "AllGather",
    "reduce_scatter": "ReduceScatter",
    "all_to_all": "AllToAll",
}


def _op_type(layer: LayerNode) -> str:
    """An identifier-like op type: the layer type (``GPT2Block``), or ``Prologue`` / ``Epilogue`` / ``Transition``."""
    name = layer.layer_type if layer.kind in ("block",) else layer.kind.capitalize()
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _attributes(values: dict) -> list[onnx.AttributeProto]:
    attrs = []
    for key, value in values.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        attrs.append(helper.make_attribute(key, value))
    return attrs


def _layer_attributes(layer: LayerNode) -> dict:
    strategy = {f"strategy_{k}": v for k, v in dataclasses.asdict(layer.strategy).items()}
    return {
        "kind": layer.kind,
        "layer_type": layer.layer_type,
        "module_path": layer.module_path,
        "stage": layer.stage,
        "strategy": layer.strategy_label,
        **strategy,
        "color": layer.color,
        "param_count": layer.param_count,
        "param_bytes": layer.param_bytes,
        "fwd_flops": layer.fwd_flops,
        "bwd_flops": layer.bwd_flops,
        "saved_activation_bytes": layer.saved_activation_bytes,
        "boundary_bytes": layer.boundary_bytes,
        "fwd_s": float(layer.fwd_s),
        "bwd_s": float(layer.bwd_s),
        "grad_sync_s": float(layer.grad_sync_s),
        "model_state_bytes": layer.model_state_bytes,
        "activation_bytes": layer.activation_bytes,
        "peak_extra_bytes": layer.peak_extra_bytes,
        "memory_bytes": layer.memory_bytes,
        "collectives": [c.label() for c in layer.collectives] or ["none"],
    }


def _collective_node(layer: LayerNode, number: int, c: Collective, source: str) -> onnx.NodeProto:
    node = helper.make_node(
        _OP_TYPES[c.op],
        [source],
        [f"L{layer.index}/{c.purpose}/{c.op}/{c.phase}/{number}"],
        name=f"L{layer.index} {c.label()}",
        domain=DOMAIN,
        doc_string=f"{c.op} over {c.group_size} ranks for {c.purpose} ({c.phase}), "
        f"{c.count} call(s) of {c.bytes_per_call} bytes",
    )
    node.attribute.extend(
        _attributes(
            {
                "collective_kind": c.op,
                "purpose": c.purpose,
                "group_size": c.group_size,
                "consecutive": c.consecutive,
                "phase": c.phase,
                "count": c.count,
                "bytes_per_call": c.bytes_per_call,
                "stage": layer.stage,
                "time_s": float(c.time_s) if c.time_s is not None else -1.0,
            }
        )
    )
    return node


def _value_info(name: str, shape, dtype, batched: bool, micro_batch: int) -> onnx.ValueInfoProto:
    dims = list(shape)
    if batched and dims:
        dims[0] = micro_batch
    return helper.make_tensor_value_info(name, _DTYPES.get(dtype, TensorProto.FLOAT), dims)


def build_onnx(graph: LayerGraph, program: Program) -> onnx.ModelProto:
    """The ONNX model of ``graph`` (see the module docstring); ``program`` gives tensor names and shapes."""
    specs = {spec.name: spec for layer in program.layers for spec in (*layer.inputs, *layer.boundary_out)}
    produced = {name for layer in program.layers for name in layer.output_names}
    placeholders = {n.name: n for n in program.graph_module.graph.nodes if n.op == "placeholder"}
    redistribution = {r.src: r for r in graph.redistributions}
    transfer = {t.src: t for t in graph.transfers}
    current: dict[str, str] = {}  # tensor name in the program → its name on the path after moves
    nodes, value_infos, inputs = [], [], []

    def info(name: str, original: str) -> None:
        spec = specs.get(original)
        if spec is not None:
            value_infos.append(_value_info(name, spec.shape, spec.dtype, spec.batched, graph.micro_batch))

    for layer, source in zip(graph.layers, program.layers):
        for name in source.input_names:
            if name not in produced and name not in current:  # a graph input of the model
                val = placeholders[name].meta.get("val") if name in placeholders else None
                shape = tuple(val.shape) if val is not None else ()
                batched = bool(shape) and shape[0] == program.batch_size
                inputs.append(
                    _value_info(
                        name, shape, val.dtype if val is not None else torch.float32, batched, graph.micro_batch
                    )
                )
                current[name] = name
        node = helper.make_node(
            _op_type(layer),
            [current[n] for n in source.input_names],
            list(source.output_names),
            name=layer.name,
            domain=DOMAIN,
            doc_string=f"{layer.layer_type} at {layer.module_path}: {layer.strategy_label} on stage {layer.stage}",
        )
        node.attribute.extend(_attributes(_layer_attributes(layer)))
        nodes.append(node)
        for name in source.output_names:
            current[name] = name
            info(name, name)
        first_output = source.output_names[0] if source.output_names else None
        for number, c in enumerate(layer.collectives):
            if first_output is not None:
                nodes.append(_collective_node(layer, number, c, first_output))
        moved = [s.name for s in source.boundary_out]
        if layer.index in redistribution:
            r = redistribution[layer.index]
            node = helper.make_node(
                "Redistribute",
                [current[n] for n in moved],
                [f"{n}@L{r.dst}" for n in moved],
                name=f"redistribute L{r.src}→L{r.dst}",
                domain=DOMAIN,
                doc_string=f"{r.src_label} → {r.dst_label}: forward {r.op}, backward {r.backward_op}",
            )
            node.attribute.extend(
                _attributes(
                    {
                        "collective_kind": r.op,
                        "backward_collective_kind": r.backward_op,
                        "stage": r.stage,
                        "from_strategy": r.src_label,
                        "to_strategy": r.dst_label,
                        "bytes": r.bytes,
                        "time_s": float(r.time_s) if r.time_s is not None else -1.0,
                    }
                )
            )
            nodes.append(node)
            for n in moved:
                current[n] = f"{n}@L{r.dst}"
                info(current[n], n)
        if layer.index in transfer:
            t = transfer[layer.index]
            node = helper.make_node(
                "SendRecv",
                [current[n] for n in moved],
                [f"{n}@stage{t.dst_stage}" for n in moved],
                name=f"send/recv stage {t.src_stage}→{t.dst_stage}",
                domain=DOMAIN,
                doc_string=f"pipeline send/recv after L{t.src}: activations forward, gradients backward",
            )
            node.attribute.extend(
                _attributes(
                    {
                        "collective_kind": "send_recv",
                        "src_stage": t.src_stage,
                        "dst_stage": t.dst_stage,
                        "bytes": t.bytes,
                        "time_s": float(t.time_s) if t.time_s is not None else -1.0,
                    }
                )
            )
            nodes.append(node)
            for n in moved:
                current[n] = f"{n}@stage{t.dst_stage}"
                info(current[n], n)

    final = [n for n in program.output_names if n is not None and n in current]
    outputs = [
        next((v for v in value_infos if v.name == current[n]), None) or helper.make_empty_tensor_value_info(current[n])
        for n in final
    ]
    onnx_graph = helper.make_graph(
        nodes,
        f"{graph.model_name} plan",
        inputs,
        outputs,
        value_info=[v for v in value_infos if v.name not in {o.name for o in outputs}],
    )
    model = helper.make_model(
        onnx_graph,
        producer_name="galvatron_fx",
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        doc_string=f"{graph.model_name}: {graph.world_size} devices, pp {graph.pp}, {graph.pipeline}, "
        f"{graph.chunks} micro-batches of {graph.micro_batch}; predictions from {graph.source}",
    )
    plan = {
        "world_size": graph.world_size,
        "pp": graph.pp,
        "pipeline": graph.pipeline,
        "chunks": graph.chunks,
        "global_batch": graph.global_batch,
        "micro_batch": graph.micro_batch,
        "iteration_s": graph.iteration_s,
        "samples_per_s": graph.samples_per_s,
        "memory_budget_bytes": graph.memory_budget_bytes,
        "source": graph.source,
        "stage_memory_bytes": [s.memory_bytes for s in graph.stages],
    }
    helper.set_model_props(
        model, {"galvatron_fx.plan": json.dumps(plan), "galvatron_fx.legend": json.dumps(dict(graph.legend))}
    )
    return model


def write_onnx(graph: LayerGraph, program: Program, path: str | Path) -> Path:
    """Build, check (``onnx.checker``) and save the ONNX file; returns its path."""
    model = build_onnx(graph, program)
    onnx.checker.check_model(model, full_check=False)
    onnx.save(model, str(path))
    return Path(path)
