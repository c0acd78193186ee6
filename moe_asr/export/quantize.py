"""int8 twins of the exported graphs: ONNX Runtime's dynamic quantization, experts included, sparse kept.

Every MatMul whose second input is a weight (attention and FFN projections,
each expert's two matrices, the CTC and decoder output layers) becomes an int8
matrix product: weights int8 with one scale per matrix, activations quantized to uint8 at run time, per call.
Left in float: the routers' logits (their MatMul is found by walking back
from each TopK, so the experts are chosen from float logits), the
activation-by-activation MatMuls of attention, convolutions, norms and
everything else. The routing ops around the experts (NonZero, Gather,
ScatterND) are untouched, so the int8 graph runs each token through its k
experts only, as the float one does.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

# Ops between a router's MatMul and its TopK (the float32 cast, the expert bias, an exporter's Identity).
_ROUTER_PATH = {"Cast", "Add", "Identity"}


def router_matmuls(graph: onnx.GraphProto) -> list[str]:
    """Names of the MatMul nodes that compute the logits a TopK chooses experts from."""
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type != "TopK":
            continue
        src = producer.get(node.input[0])
        while src is not None and src.op_type in _ROUTER_PATH:
            src = producer.get(src.input[0])
        if src is not None and src.op_type == "MatMul":
            found.append(src.name)
    return found


def quantize_graph(src: Path, dst: Path) -> Path:
    """Write the int8 twin of the graph ``src`` to ``dst`` (inputs, outputs and metadata unchanged)."""
    model = onnx.load(str(src))
    keep = router_matmuls(model.graph)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        before = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its advice to pre-process for static quantization, once per graph
        try:
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            logging.disable(before)
        quantized = onnx.load(str(out))
    # The float graph's declarations: the quantizer's shape inference fixes some named axes to numbers.
    for mine, theirs in ((quantized.graph.input, model.graph.input), (quantized.graph.output, model.graph.output),
                         (quantized.metadata_props, model.metadata_props)):
        del mine[:]
        mine.extend(theirs)
    # No onnx.checker here: it refuses the quantizer's node order inside a decoder's If subgraph,
    # which ONNX Runtime loads and runs (tests/export/test_onnx_int8.py runs every int8 graph).
    onnx.save(quantized, str(dst))
    return dst
