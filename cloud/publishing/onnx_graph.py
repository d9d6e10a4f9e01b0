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


# Below this many query tokens the ONNX Attention op measured as fast or faster (ViT-B/16's 197,
# DINOv2-S's 257, the tiny encoders' 65); flash attention pays off once the scores leave the cache.
MHA_MIN_TOKENS = 512


def attention_to_3d(model: onnx.ModelProto) -> dict[str, int]:
    """Feed attention [B, S, H*D] directly instead of [B, H, S, D]; unmasked ones become MultiHeadAttention.

    The exporter wraps every attention in Reshape+Transpose on q, k, v and on
    the output (7 nodes, ~20 us each at batch 1); both ops below do the head
    split themselves. An all-true constant mask (what SDPA gets when nothing is
    padded) is dropped. Unmasked and long (MHA_MIN_TOKENS), com.microsoft MultiHeadAttention runs
    onnxruntime's CPU flash attention: measured 17.7 ms against the ONNX
    Attention op's 26.2 ms for AST-base's 1214 tokens x 12 heads (2 threads),
    16.0 against 28.3 for Whisper-base's 1500 x 8, the same numbers within
    2e-7. The others stay ONNX Attention (opset 23), given their head count.
    The head count is read per node from the exporter's head-split Reshape, so
    attentions of different widths (an encoder's 12 heads, the fusion's 3) each
    get their own. Returns {"MultiHeadAttention": n, "Attention": n} rewritten.
    """
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    renamed: dict[str, str] = {}
    replaced: dict[int, onnx.NodeProto] = {}
    rewritten = {"MultiHeadAttention": 0, "Attention": 0}
    for att in [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        attrs = {a.name: helper.get_attribute_value(a) for a in att.attribute}
        if "q_num_heads" in attrs or len(att.input) > 4 or attrs.get("is_causal", 0) or attrs.get("softcap", 0.0):
            continue  # already 3-D, past key/value, causal or soft-capped: not ours
        split = [_unheaded(name, producer, inits) for name in att.input[:3]]
        final = _headed_output_end(att.output[0], consumers)
        if None in split or final is None or len({heads for _, heads, _ in split}) != 1:
            continue
        flat_inputs, heads, tokens = [name for name, _, _ in split], split[0][1], split[0][2]
        mask = att.input[3] if len(att.input) > 3 else ""
        if mask and _is_all_true_constant(mask, producer, inits):
            mask = ""
        if mask or tokens < MHA_MIN_TOKENS:
            del att.input[:]
            att.input.extend([*flat_inputs, mask])
            att.attribute.extend([helper.make_attribute("q_num_heads", heads),
                                  helper.make_attribute("kv_num_heads", heads)])
            renamed[final.output[0]] = att.output[0]
            rewritten["Attention"] += 1
            continue
        extra = {"scale": float(attrs["scale"])} if attrs.get("scale") else {}  # unset: 1/sqrt(head size), as both do
        replaced[id(att)] = helper.make_node("MultiHeadAttention", flat_inputs, [att.output[0]], domain="com.microsoft",
                                             name=f"{att.name or att.output[0]}_mha", num_heads=heads, **extra)
        renamed[final.output[0]] = att.output[0]
        rewritten["MultiHeadAttention"] += 1
    if replaced:
        nodes = [replaced.get(id(n), n) for n in graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
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


def _unheaded(name: str, producer: dict, inits: dict) -> tuple[str, int, int] | None:
    """(x, H, S) for `Transpose(Reshape(x, [B, S, H, D]), perm=[0, 2, 1, 3])` with a constant shape, else None.

    S is 0 when the exporter left it dynamic."""
    transpose = producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = producer.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape" or reshape.input[1] not in inits:
        return None
    shape = numpy_helper.to_array(inits[reshape.input[1]])
    if shape.shape != (4,) or shape[2] <= 0:
        return None
    return reshape.input[0], int(shape[2]), max(int(shape[1]), 0)


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



# Elementwise ops of one input that run the same on a transposed tensor (the activations between convolutions).
_LAYOUT_FREE_UNARY = {"Gelu", "Relu", "Erf", "Tanh", "Sigmoid", "Identity"}


def conv1d_as_matmul(model: onnx.ModelProto, min_reduction: int = 256) -> int:
    """Rewrite unpadded, ungrouped 1-D convolutions as strided slices + one MatMul, which the INT8 quantizer takes.

    wav2vec2/HuBERT's front-end (six 512->512 convolutions, kernel 3 or 2, stride 2) is 60% of
    their INT8 latency while it stays in float, and ConvInteger both loses accuracy and runs
    slower than the float Conv here. As a MatMul it is quantized like every projection (per output
    channel weights, dynamic activations). The work runs channels-last, [B, L, C]: tap j of
    kernel k at stride s is the rows from j to k-1-j before the end, stepping s (exactly the
    (L-k)//s + 1 outputs' j-th taps, whatever L is, so the time axis stays dynamic); the taps are
    concatenated on the channel axis and multiplied by the weight as [k*C, O] (one MatMul per tap,
    summed, measured 5% slower: each quantizes its input again, and the sums cost). A chain of such
    convolutions with activations between stays channels-last (no transposes between them); the
    [B, C, L] result is made only where something else reads it. Convolutions whose taps (in
    channels x kernel) number fewer than `min_reduction` (the first, 1-channel one) stay Conv: a
    MatMul that short gains nothing. Returns the number rewritten.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {out: n for n in graph.node for out in n.output}
    channels_last: dict[str, str] = {}  # [B, C, L] tensor -> the same as [B, L, C]
    rewritten, nodes = 0, []
    for node in graph.node:
        shape = _plain_conv1d(node, inits)
        if shape is None or shape[1] * shape[2] < min_reduction:
            nodes.append(node)
            continue
        (out_ch, in_ch, k), stride = shape[:3], shape[3]
        base = f"{node.name or node.output[0]}_as_matmul"
        rows = _channels_last_input(node.input[0], base, producer, consumers, channels_last, nodes)
        w = numpy_helper.to_array(inits[node.input[1]])  # [O, C, k] -> [k*C, O], row j*C + c
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(w.transpose(2, 1, 0).reshape(k * in_ch, out_ch)), f"{base}_w"),
            numpy_helper.from_array(np.array([1], np.int64), f"{base}_axes"),
            numpy_helper.from_array(np.array([stride], np.int64), f"{base}_steps"),
        ])
        taps = []
        for j in range(k):
            end = -(k - 1 - j) if j < k - 1 else np.iinfo(np.int64).max
            graph.initializer.extend([numpy_helper.from_array(np.array([j], np.int64), f"{base}_start{j}"),
                                      numpy_helper.from_array(np.array([end], np.int64), f"{base}_end{j}")])
            nodes.append(helper.make_node("Slice", [rows, f"{base}_start{j}", f"{base}_end{j}", f"{base}_axes",
                                                    f"{base}_steps"], [f"{base}_tap{j}"], name=f"{base}_tap{j}"))
            taps.append(f"{base}_tap{j}")
        nodes.extend([
            helper.make_node("Concat", taps, [f"{base}_cols"], axis=2, name=f"{base}_cols"),  # [B, L', k*C]
            helper.make_node("MatMul", [f"{base}_cols", f"{base}_w"], [f"{base}_mm"], name=f"{base}_mm"),
        ])
        last = f"{base}_mm"
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [last, node.input[2]], [f"{base}_biased"], name=f"{base}_bias"))
            last = f"{base}_biased"
        nodes.append(helper.make_node("Transpose", [last], [node.output[0]], perm=[0, 2, 1], name=f"{base}_out"))
        channels_last[node.output[0]] = last
        rewritten += 1
    # a transpose of a rewritten result back to [B, L, C] (wav2vec2's feature projection) is the channels-last tensor
    renamed = {n.output[0]: channels_last[n.input[0]] for n in nodes
               if n.op_type == "Transpose" and _perm(n) == [0, 2, 1] and n.input[0] in channels_last}
    del graph.node[:]
    graph.node.extend(nodes)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    if any(out.name in renamed for out in graph.output):
        raise ValueError("a convolution's transposed output is a graph output; refusing to rename it")
    _drop_dead_nodes(graph)
    return rewritten


def _plain_conv1d(node: onnx.NodeProto, inits: dict) -> tuple[int, int, int, int] | None:
    """(out channels, in channels, kernel, stride) of an unpadded, undilated, ungrouped float 1-D Conv with constant
    weights (and bias), else None."""
    weight = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    if weight is None or len(weight.dims) != 3 or weight.data_type != onnx.TensorProto.FLOAT:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (attrs.get("group", 1) != 1 or any(attrs.get("pads", [0])) or any(d != 1 for d in attrs.get("dilations", [1]))
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    return (*weight.dims, attrs.get("strides", [1])[0])


def _channels_last_input(name: str, base: str, producer: dict, consumers: dict, channels_last: dict,
                         nodes: list) -> str:
    """The [B, L, C] form of the [B, C, L] tensor `name`, appending to `nodes` what makes it: nothing when it is a
    rewritten convolution's result, the activation again on that result's channels-last form when it is one
    activation away from it (read by nothing else), else a Transpose."""
    if name in channels_last:
        return channels_last[name]
    act = producer.get(name)
    if (act is not None and act.op_type in _LAYOUT_FREE_UNARY and len(act.input) == 1 and act.input[0] in channels_last
            and len(consumers.get(name, [])) == 1):
        twin = onnx.NodeProto()
        twin.CopyFrom(act)
        del twin.input[:], twin.output[:]
        twin.input.append(channels_last[act.input[0]])
        twin.output.append(f"{base}_rows")
        twin.name = f"{base}_rows"
        nodes.append(twin)
    else:
        nodes.append(helper.make_node("Transpose", [name], [f"{base}_rows"], perm=[0, 2, 1], name=f"{base}_rows"))
    channels_last[name] = f"{base}_rows"
    return f"{base}_rows"


def group_norm_as_instance_norm(model: onnx.ModelProto) -> int:
    """GroupNormalization with one channel per group -> InstanceNormalization (the same statistics, per channel).

    onnxruntime has no CPU kernel for GroupNormalization-21 and runs its function body (ReduceMean,
    Sub, Mul, Div, ... over the whole tensor): measured ~45% of wav2vec2's front-end, whose first
    layer is GroupNorm(512 groups, 512 channels). InstanceNormalization is a native kernel.
    Returns the number rewritten.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    rewritten = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "GroupNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = inits.get(node.input[1])
        if scale is None or int(np.prod(scale.dims)) != attrs.get("num_groups") or attrs.get("stash_type", 1) != 1:
            continue  # more than one channel per group, a computed scale, or statistics not in float
        graph.node[i].CopyFrom(helper.make_node("InstanceNormalization", list(node.input), list(node.output),
                                                name=node.name, epsilon=float(attrs.get("epsilon", 1e-5))))
        rewritten += 1
    return rewritten
