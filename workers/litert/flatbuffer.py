"""What a .tflite file holds, read from its flatbuffer with the schema LiteRT ships (no interpreter, no TensorFlow):
its weights for the size report, its operators and tensor types for the export record (whether int8 is full-integer
shows there)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

TFLITE_SUFFIX = ".tflite"


def _names(enum: type) -> dict[int, str]:
    return {value: name for name, value in vars(enum).items() if not name.startswith("_") and isinstance(value, int)}


def read(path: Path) -> dict[str, Any]:
    """parameters: the element count of every tensor whose data the file stores (weights, biases, and the int8
    model's quantized constants); initializer_bytes: those tensors' bytes; operators: builtin op name -> count;
    tensor_types: type name -> count of the tensors of the main graph."""
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    op_names, type_names = _names(schema.BuiltinOperator), _names(schema.TensorType)
    parameters = stored = 0
    operators: Counter[str] = Counter()
    tensor_types: Counter[str] = Counter()
    seen_buffers: set[int] = set()
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            if g == 0:
                tensor_types[type_names.get(tensor.Type(), str(tensor.Type()))] += 1
            index = tensor.Buffer()
            if index == 0 or index in seen_buffers or index >= model.BuffersLength():
                continue  # buffer 0 is the empty sentinel; a buffer two tensors share counts once
            buffer = model.Buffers(index)
            size = buffer.DataLength() or int(buffer.Size())  # Size: data stored after the flatbuffer (large models)
            if size:
                seen_buffers.add(index)
                parameters += int(np.prod(tensor.ShapeAsNumpy())) if tensor.ShapeLength() else 1
                stored += size
        for o in range(graph.OperatorsLength()):
            code = codes[graph.Operators(o).OpcodeIndex()]
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            operators[code.CustomCode().decode() if code.CustomCode() else op_names.get(builtin, str(builtin))] += 1
    return {"parameters": parameters, "initializer_bytes": stored, "operators": dict(operators.most_common()),
            "tensor_types": dict(tensor_types.most_common())}


def size(path: Path) -> dict[str, Any]:
    """The size report's entry for a .tflite file (workers.measure.targets.ir_size's counterpart)."""
    found = read(path)
    return {"file_bytes": Path(path).stat().st_size, "external_data_files": 0, "parameters": found["parameters"],
            "initializer_bytes": found["initializer_bytes"], "format": "tflite"}
