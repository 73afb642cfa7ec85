#!/usr/bin/env python3
"""Writes tiny ONNX models that break the mgd3 model contract on purpose, one way each, so the
Rust loader's errors can be tested: tests/fixtures/models/bad_dit_*.onnx and bf16_dit.onnx (a few
hundred bytes), and
copies of the tiny VAE whose outputs turn non-finite: {nan,inf}_vae_encoder.onnx, nan_vae_decoder.onnx,
and external/tiny_vae_decoder.onnx, the tiny VAE decoder with its weights in two external files."""
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


def poisoned_vae(source, target, output, make):
    """A copy of the tiny VAE half `source` whose `output` gets `make(graph, raw)` added: the
    non-finite VAE outputs of fp16 SD-VAE overflow (diffusers 4325, 7188, 9844), on demand."""
    model = onnx.load(os.path.join(OUT, source))
    graph = model.graph
    raw = output + "_raw"
    for node in graph.node:
        node.output[:] = [raw if o == output else o for o in node.output]
    graph.initializer.extend([
        helper.make_tensor("poison_one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("poison_zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("poison_axes", TensorProto.INT64, [3], [1, 2, 3]),
    ])
    extra = make(raw)
    graph.node.extend(extra)
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(OUT, target))


def black_pixel_log(image):
    """log(min over the item of (image + 1)): -inf for an item holding a black pixel (-1 after
    Normalize(0.5, 0.5)), finite otherwise. Shape [B, 1, 1, 1]."""
    return [
        helper.make_node("Add", [image, "poison_one"], ["poison_shifted"]),
        helper.make_node("ReduceMin", ["poison_shifted", "poison_axes"], ["poison_min"], keepdims=1),
        helper.make_node("Log", ["poison_min"], ["poison_log"]),
    ]


def external_layout(source, target_dir):
    """The tiny VAE half `source` with its weights outside the .onnx under names mgd3 does not
    choose: the first half of the tensors in `model.onnx_data` (HF optimum's and torch.onnx's
    name), the rest in `weights/rest.bin` (a second file, in a subfolder)."""
    from onnx import external_data_helper, numpy_helper
    model = onnx.load(os.path.join(OUT, source))
    folder = os.path.join(OUT, target_dir)
    os.makedirs(os.path.join(folder, "weights"), exist_ok=True)
    files = {"model.onnx_data": bytearray(), "weights/rest.bin": bytearray()}
    # Weights only: shape tensors stay inside, as onnx.save_model's size threshold keeps them.
    tensors = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and numpy_helper.to_array(t).size >= 256]
    for i, tensor in enumerate(tensors):
        location = "model.onnx_data" if i < len(tensors) // 2 else "weights/rest.bin"
        raw = numpy_helper.to_array(tensor).tobytes()
        offset = len(files[location])
        files[location] += raw
        for field in ("float_data", "int64_data", "int32_data", "double_data"):
            tensor.ClearField(field)
        tensor.raw_data = raw
        external_data_helper.set_external_data(tensor, location, offset, len(raw))
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
    for location, data in files.items():
        with open(os.path.join(folder, location), "wb") as f:
            f.write(bytes(data))
    with open(os.path.join(folder, source), "wb") as f:
        f.write(model.SerializeToString())


def main():
    os.makedirs(OUT, exist_ok=True)
    external_layout("tiny_vae_decoder.onnx", "external")
    # VAE encoders whose `mean` is NaN (0 * -inf) or +inf (-log 0) for images holding a black
    # pixel, and unchanged for the others.
    poisoned_vae("tiny_vae_encoder.onnx", "nan_vae_encoder.onnx", "mean", lambda raw: black_pixel_log("image") + [
        helper.make_node("Mul", ["poison_log", "poison_zero"], ["poison_nan"]),
        helper.make_node("Add", [raw, "poison_nan"], ["mean"]),
    ])
    poisoned_vae("tiny_vae_encoder.onnx", "inf_vae_encoder.onnx", "mean", lambda raw: black_pixel_log("image") + [
        helper.make_node("Neg", ["poison_log"], ["poison_inf"]),
        helper.make_node("Add", [raw, "poison_inf"], ["mean"]),
    ])
    # A VAE decoder whose every image is NaN: log(min(latent - latent)) * 0.
    poisoned_vae("tiny_vae_decoder.onnx", "nan_vae_decoder.onnx", "image", lambda raw: [
        helper.make_node("Sub", ["latent", "latent"], ["poison_zeros"]),
        helper.make_node("ReduceMin", ["poison_zeros", "poison_axes"], ["poison_min"], keepdims=1),
        helper.make_node("Log", ["poison_min"], ["poison_log"]),
        helper.make_node("Mul", ["poison_log", "poison_zero"], ["poison_nan"]),
        helper.make_node("Add", [raw, "poison_nan"], ["image"]),
    ])
    # x has rank 3 instead of [B, C, h, w].
    dit_like("bad_dit_rank.onnx", ["batch", 4, 8])
    # A DiT-shaped graph without the mgd3.num_classes metadata.
    dit_like("bad_dit_no_metadata.onnx", ["batch", 4, 8, 8],
             metadata={k: v for k, v in DIT_METADATA.items() if k != "mgd3.num_classes"})
    # The timestep input is missing.
    dit_like("bad_dit_missing_t.onnx", ["batch", 4, 8, 8], with_t=False)
    # Labelled a bf16 export (which ONNX Runtime runs on CUDA only): a CPU worker refuses it by its
    # metadata before building a session.
    dit_like("bf16_dit.onnx", ["batch", 4, 8, 8], metadata={**DIT_METADATA, "mgd3.precision": "bf16"})
    print("wrote bad_dit_{rank,no_metadata,missing_t}.onnx, bf16_dit.onnx, {nan,inf}_vae_encoder.onnx, nan_vae_decoder.onnx and external/ into",
          os.path.abspath(OUT))


if __name__ == "__main__":
    main()
