#!/usr/bin/env python3
"""Writes tiny ONNX models that break the mgd3 model contract on purpose, one way each, so the
Rust loader's errors can be tested: tests/fixtures/models/bad_dit_*.onnx (a few hundred bytes)."""
import os
import sys

import onnx
from onnx import TensorProto, helper

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "models")

DIT_METADATA = {
    "mgd3.kind": "dit",
    "mgd3.num_classes": "10",
    "mgd3.learn_sigma": "true",
    "mgd3.train_timesteps": "1000",
    "mgd3.beta_schedule": "linear",
    "mgd3.beta_start": "0.0001",
    "mgd3.beta_end": "0.02",
}


def dit_like(name, x_shape, with_t=True, metadata=DIT_METADATA):
    """out = concat(x, x) over channels; t and y are declared (and unused) like a DiT's."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if with_t:
        inputs.append(helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]))
    inputs.append(helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]))
    out_shape = list(x_shape)
    out_shape[1] = x_shape[1] * 2 if isinstance(x_shape[1], int) else x_shape[1]
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["out"], axis=1)],
        name,
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(OUT, name))


def main():
    os.makedirs(OUT, exist_ok=True)
    # x has rank 3 instead of [B, C, h, w].
    dit_like("bad_dit_rank.onnx", ["batch", 4, 8])
    # A DiT-shaped graph without the mgd3.num_classes metadata.
    dit_like("bad_dit_no_metadata.onnx", ["batch", 4, 8, 8],
             metadata={k: v for k, v in DIT_METADATA.items() if k != "mgd3.num_classes"})
    # The timestep input is missing.
    dit_like("bad_dit_missing_t.onnx", ["batch", 4, 8, 8], with_t=False)
    print("wrote bad_dit_{rank,no_metadata,missing_t}.onnx into", os.path.abspath(OUT))


if __name__ == "__main__":
    main()
