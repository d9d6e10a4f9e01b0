"""Graph clean-ups between torch.onnx's output and quantization.

Each pass is exact (same numbers, fewer or cheaper nodes) and leaves the
graph alone where its pattern does not match, so a change in the exporter
costs speed, never correctness. The parity gate checks the result anyway.

Measured on the default model (batch 1, 2 threads, INT8): the exporter's
graph runs in 5.8 ms, with these passes in 5.0-5.3 ms (PyTorch eager ~10.5 ms;
benchmarks/bench_onnx.py has the current figures). Tried and dropped because
they measured slower here: packing q/k/v into com.microsoft Attention
(QAttention), SkipLayerNormalization fusion, tanh GELU, MatMulNBits with INT8
compute.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node metadata (stack traces, source paths: ~5% of the file) and stale value_info.

    The dynamo exporter's value_info also trips onnxruntime's quantizer, which
    re-runs shape inference and disagrees with the stale shapes.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]


def fold_constant_splits(model: onnx.ModelProto) -> int:
    """Replace Split/Transpose of an initializer by the resulting initializers.

    nn.MultiheadAttention keeps q, k and v in one `in_proj_weight`; split at run
    time, the quantizer sees no constant weight and leaves them in float.
    Returns the number of nodes folded.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded, keep = 0, []
    for node in graph.node:
        source = inits.get(node.input[0]) if node.input else None
        if source is None or node.op_type not in ("Split", "Transpose"):
            keep.append(node)
            continue
        value = numpy_helper.to_array(source)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Transpose":
            outputs = [value.transpose(attrs.get("perm"))]
        else:
            sizes = _split_sizes(node, inits, value, attrs)
            if sizes is None:
                keep.append(node)
                continue
            outputs = np.split(value, np.cumsum(sizes)[:-1], axis=attrs.get("axis", 0))
        for name, array in zip(node.output, outputs):
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
            graph.initializer.append(inits[name])
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_initializers(graph)
    return folded


def _split_sizes(node: onnx.NodeProto, inits: dict, value: np.ndarray, attrs: dict) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in inits:
            return None
        return [int(s) for s in numpy_helper.to_array(inits[node.input[1]])]
    parts = len(node.output)
    length = value.shape[attrs.get("axis", 0)]
    return [length // parts] * parts if length % parts == 0 else None


def attention_to_3d(model: onnx.ModelProto, num_heads: int) -> int:
    """Feed ONNX Attention (opset 23) [B, S, H*D] directly instead of [B, H, S, D].

    The exporter wraps every attention in Reshape+Transpose on q, k, v and on
    the output (7 nodes, ~20 us each at batch 1); the op does the head split
    itself when given `q_num_heads`/`kv_num_heads`. An all-true constant mask
    (what SDPA gets when nothing is padded) is dropped too. Returns the number
    of attention nodes rewritten.
    """
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    renamed: dict[str, str] = {}
    rewritten = 0
    for att in [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        if any(a.name in ("q_num_heads", "kv_num_heads") for a in att.attribute):
            continue
        flat_inputs = [_unheaded(name, producer) for name in att.input[:3]]
        final = _headed_output_end(att.output[0], consumers)
        if None in flat_inputs or final is None:
            continue
        mask = att.input[3] if len(att.input) > 3 else ""
        if mask and _is_all_true_constant(mask, producer, inits):
            mask = ""
        if len(att.input) > 4:
            continue  # past key/value: not ours
        del att.input[:]
        att.input.extend(flat_inputs + ([mask] if mask else []))
        att.attribute.extend([helper.make_attribute("q_num_heads", num_heads),
                              helper.make_attribute("kv_num_heads", num_heads)])
        renamed[final.output[0]] = att.output[0]
        rewritten += 1
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    if any(out.name in renamed for out in graph.output):
        raise ValueError("attention output is a graph output; refusing to rename it")
    _drop_dead_nodes(graph)
    return rewritten


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _unheaded(name: str, producer: dict) -> str | None:
    """x for `Transpose(Reshape(x, [B, S, H, D]), perm=[0, 2, 1, 3])`, else None."""
    transpose = producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = producer.get(transpose.input[0])
    return reshape.input[0] if reshape is not None and reshape.op_type == "Reshape" else None


def _headed_output_end(name: str, consumers: dict) -> onnx.NodeProto | None:
    """The Reshape that turns the [B, H, S, D] output back into [B, S, H*D]."""
    chain: list[onnx.NodeProto] = []
    while len(chain) < 3:
        users = consumers.get(name, [])
        if len(users) != 1:
            break
        chain.append(users[0])
        name = users[0].output[0]
    ops = [n.op_type for n in chain]
    if ops[:2] == ["Transpose", "Reshape"] and _perm(chain[0]) == [0, 2, 1, 3]:
        return chain[1]
    if ops == ["Reshape", "Transpose", "Reshape"] and _perm(chain[1]) == [0, 2, 1, 3]:
        return chain[2]  # a leading view-reshape to the same [B, H, S, D]
    return None


def _is_all_true_constant(name: str, producer: dict, inits: dict) -> bool:
    node = producer.get(name)
    if node is not None and node.op_type == "Expand":
        name = node.input[0]
    return name in inits and inits[name].data_type == onnx.TensorProto.BOOL and bool(
        numpy_helper.to_array(inits[name]).all()
    )


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def conv_weights_int8(model: onnx.ModelProto) -> int:
    """Store float Conv weights as per-output-channel INT8 + DequantizeLinear (compute stays float).

    The patch embeddings run faster as float convolutions than as ConvInteger,
    but their weights are 5% of the file; stored as INT8 they cost a quarter.
    onnxruntime folds the constant DequantizeLinear when the session loads if
    its QDQ handling is off (`open_session` does that; otherwise it runs each
    call, ~0.2 ms).
    Returns the number of weights converted.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    converted, nodes = 0, []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        scale = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
        base = weight.name
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_int8"),
            numpy_helper.from_array(scale, f"{base}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_zero"),
        ])
        nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_scale", f"{base}_zero"],
                                      [f"{base}_dequantized"], axis=0, name=f"{base}_dequantize"))
        node.input[1] = f"{base}_dequantized"
        nodes.append(node)
        converted += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return converted

