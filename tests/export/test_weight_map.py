"""Graphs whose weights LoRAs change keep them in external data: saved once, not appended to a copy."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from diffrt.export.weight_map import externalize


def _graph(weights: list[np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(len(weights))]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [256])
    y = helper.make_tensor_value_info(f"y{len(weights) - 1}", onnx.TensorProto.FLOAT, [256])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))


def test_externalize_writes_each_weight_once_also_over_external_data(tmp_path):
    weights = [np.random.default_rng(i).standard_normal(256).astype(np.float32) for i in range(3)]
    inline, external = tmp_path / "inline.onnx", tmp_path / "external.onnx"
    onnx.save_model(_graph(weights), str(inline))
    # a graph past protobuf's 2 GB arrives with its weights in <name>.data already
    onnx.save_model(_graph(weights), str(external), save_as_external_data=True, location="external.onnx.data",
                    size_threshold=0)  # fmt: skip
    for path in (inline, external):
        externalize(path)
        data = path.with_name(path.name + ".data")
        assert data.stat().st_size == sum(w.nbytes for w in weights)  # not twice: onnx appends to an existing file
        model = onnx.load(str(path))
        for i, w in enumerate(weights):
            got = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"w{i}"))
            np.testing.assert_array_equal(got, w)
