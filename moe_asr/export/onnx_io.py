"""Writing a graph to an .onnx file, and describing a file's inputs and outputs from the file itself."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

# One name per axis, a str for a dynamic axis, an int for a fixed one.
Axes = tuple[str | int, ...]


def save_graph(module: nn.Module, example: tuple[Tensor, ...], path: Path, inputs: dict[str, Axes],
               outputs: dict[str, Axes], opset: int, metadata: dict[str, str | int] | None = None) -> Path:
    """Trace ``module`` on ``example`` into ``path`` (TorchScript-based exporter); axes named by a
    str stay dynamic."""
    if opset < 17:
        raise ValueError(f"opset {opset}: the graphs need opset >= 17 (LayerNormalization)")
    dynamic = {name: {i: a for i, a in enumerate(axes) if isinstance(a, str)}
               for name, axes in {**inputs, **outputs}.items()}
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about Python values taken from tensors; the tests check every graph's outputs.
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), dynamo=False, opset_version=opset,
                          input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes={k: v for k, v in dynamic.items() if v})
    proto = onnx.load(str(path))
    _keep_inputs(proto.graph, inputs, example)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _keep_inputs(graph: onnx.GraphProto, inputs: dict[str, Axes], example: tuple[Tensor, ...]) -> None:
    """Every declared input, in the declared order, even one the traced graph does not use
    (the exporter drops those, and a runtime that feeds inputs by position, as sherpa-onnx
    does, would then shift them)."""
    present = {v.name: v for v in graph.input}
    ordered = [present.get(name) or onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(value.numpy().dtype), list(axes))
        for (name, axes), value in zip(inputs.items(), example)]
    del graph.input[:]
    graph.input.extend(ordered)


def describe(path: Path) -> dict:
    """Inputs and outputs (name, element type, axes) and metadata of an .onnx file, as written."""
    proto = onnx.load(str(path), load_external_data=False)

    def values(items) -> list[dict]:
        return [{"name": v.name, "type": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in items]

    return {"inputs": values(proto.graph.input), "outputs": values(proto.graph.output),
            "metadata": {p.key: p.value for p in proto.metadata_props}}
