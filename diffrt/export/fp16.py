"""FP32 ONNX graph -> FP16 graph with explicit FP32 islands (for strongly typed TensorRT and ORT).

Policy (docs/export.md explains the why):
- weights and the heavy ops (Conv, MatMul, Gemm, attention) run in FP16;
- normalisation ops (LayerNorm, GroupNorm/InstanceNorm) run in FP32: their mean/variance reductions lose
  accuracy and can overflow in FP16;
- "precise" preprocessing stays FP32: everything computed from a graph input through cheap ops before the
  first weight-bearing op, e.g. the sinusoidal timestep embedding, where sin(999 * f) in FP16 is wrong;
- with `fp32_attention`, attention scores (the MatMul feeding a Softmax and the ops between) and the Softmax
  run in FP32, for checkpoints that ask for upcast attention (SD 2.x at 768);
- graph inputs and outputs keep FP32, so callers feed the same arrays to both precisions.
Every change of precision is an explicit Cast node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
NORM_OPS = {
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
    "RMSNormalization",
}
COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"}
# Inputs whose type is fixed to float32 by the ONNX spec whatever the data type.
FIXED_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
ELEMENTWISE = {"Mul", "Div", "Add", "Sub", "Where", "Cast"}


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes with a tensor value become initializers, so one code path converts all weights."""
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _attention_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of Softmax nodes and, walking back through elementwise ops, the MatMul that makes their scores."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    marked: set[int] = set()
    for i, node in enumerate(graph.node):
        if node.op_type != "Softmax":
            continue
        marked.add(i)
        stack = [node.input[0]]
        while stack:
            j = producer.get(stack.pop())
            if j is None or j in marked:
                continue
            op = graph.node[j].op_type
            if op == "MatMul":
                marked.add(j)
            elif op in ELEMENTWISE:
                marked.add(j)
                stack.extend(graph.node[j].input[:2])
    return marked


def convert_to_fp16(model: onnx.ModelProto, fp32_attention: bool = False) -> onnx.ModelProto:
    """Convert `model` in place to FP16 with FP32 islands and return it (in place: an SD UNet is 3.4 GB)."""
    graph = model.graph
    _constants_to_initializers(graph)

    dtype = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.value_info) + list(graph.output)}
    dtype.update({vi.name: vi.type.tensor_type.elem_type for vi in graph.input})
    inits = {t.name: t for t in graph.initializer}
    dtype.update({name: t.data_type for name, t in inits.items()})
    neutral = set(inits)  # constants: converted to whatever their consumer runs in
    precise = {vi.name for vi in graph.input if vi.type.tensor_type.elem_type == FLOAT}
    attention = _attention_nodes(graph) if fp32_attention else set()

    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    outputs = {o.name for o in graph.output}

    def as_type(name: str, want: int) -> str:
        """Name of `name` converted to `want` (FLOAT or HALF): an FP16 weight copy or a Cast node."""
        have = dtype.get(name)
        if have == want or have not in (FLOAT, HALF):
            return name
        if name in inits and want == HALF:
            if name not in half_inits:
                # Clip to FP16's range: constants like a causal mask's float32 minimum stay finite.
                arr = np.clip(numpy_helper.to_array(inits[name]), -65504, 65504).astype(np.float16)
                t = numpy_helper.from_array(arr, name + "__fp16")
                graph.initializer.append(t)
                half_inits[name] = t.name
                dtype[t.name] = HALF
            return half_inits[name]
        key = (name, want)
        if key not in casts:
            out = f"{name}__to_{'fp16' if want == HALF else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], to=want, name=out))
            dtype[out] = want
            casts[key] = out
        return casts[key]

    for i, node in enumerate(graph.node):
        float_in = [k for k, x in enumerate(node.input) if x and dtype.get(x) in (FLOAT, HALF)]
        float_in = [k for k in float_in if k not in FIXED_INPUTS.get(node.op_type, ())]
        float_out = [o for o in node.output if dtype.get(o) in (FLOAT, HALF)]
        if not float_in and not float_out:
            nodes.append(node)  # integer / shape arithmetic: untouched
            continue
        data_in = [node.input[k] for k in float_in if node.input[k] not in neutral]
        dynamic_other = [x for k, x in enumerate(node.input) if x and k not in float_in and x not in inits]
        is_precise = bool(data_in) and node.op_type not in COMPUTE_OPS and all(x in precise for x in data_in)
        is_source = not data_in and not (float_in and dynamic_other)  # constants only, or int -> float
        if node.op_type in NORM_OPS or i in attention or is_precise or is_source:
            want = FLOAT
        else:
            want = HALF  # includes lookups of weights by dynamic indices (Gather of an embedding table)
        for k in float_in:
            node.input[k] = as_type(node.input[k], want)
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i in (FLOAT, HALF):
                to.i = want
        for o in float_out:
            dtype[o] = want
            if is_precise:
                precise.add(o)
            elif is_source:
                neutral.add(o)
        nodes.append(node)

    # Graph outputs keep FP32: rename an FP16 producer's output and cast it back under the original name.
    for name in outputs:
        if dtype.get(name) == HALF:
            for node in nodes:
                node.input[:] = [name + "__fp16" if x == name else x for x in node.input]
                node.output[:] = [name + "__fp16" if x == name else x for x in node.output]
            # node name distinct from as_type's Casts: an output also read inside the graph has one of those
            nodes.append(helper.make_node("Cast", [name + "__fp16"], [name], to=FLOAT, name=name + "__output"))
            dtype[name + "__fp16"] = HALF
            dtype[name] = FLOAT

    del graph.node[:]
    graph.node.extend(_topological(nodes))
    used = {x for n in graph.node for x in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for vi in graph.value_info:
        if vi.name in dtype and vi.type.tensor_type.elem_type in (FLOAT, HALF):
            vi.type.tensor_type.elem_type = dtype[vi.name]
    # Declare the inserted Casts' outputs (same shape as their source) so the graph stays fully typed.
    shapes = {vi.name: vi for vi in list(graph.value_info) + list(graph.input)}
    for (source, want), name in casts.items():
        vi = graph.value_info.add()
        if source in shapes:
            vi.CopyFrom(shapes[source])
        vi.name = name
        vi.type.tensor_type.elem_type = want
    return model


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Order nodes so each comes after its producers (inserted Casts were appended out of order)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if i in done:
                continue
            if expanded:
                done.add(i)
                order.append(nodes[i])
                continue
            stack.append((i, True))
            for x in nodes[i].input:
                j = producer.get(x)
                if j is not None and j not in done:
                    stack.append((j, False))
    return order


def fp16_fraction(model: onnx.ModelProto) -> float:
    """Share of float weight elements stored as FP16 (1.0 = all weights FP16)."""
    half = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == HALF)
    full = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == FLOAT)
    return half / max(half + full, 1)
