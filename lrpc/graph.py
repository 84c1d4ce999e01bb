"""Small helpers over onnx-ir: a node builder for everything lrpc adds, and attribute/constant access."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx_ir as ir

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
PREFIX = "lrp_"


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is an initializer or a Constant's output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def same_dim(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same named symbolic dim."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    a_name, b_name = getattr(a, "value", None), getattr(b, "value", None)
    return a_name is not None and a_name == b_name


def all_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | {v.name for v in graph.outputs} | set(graph.initializers)
    for node in graph:
        names.update(o.name for o in node.outputs if o.name)
        if node.name:
            names.add(node.name)
    return names


def _plain(value):
    """numpy scalars (and lists of them) as Python numbers, which onnx-ir's attribute conversion expects."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


class Builder:
    """Appends new nodes and constants to a graph; every name it makes starts with `lrp_` and is unique.

    Any attribute lookup that starts with a capital letter is an ONNX op: ``b.Mul(x, y)`` adds a
    Mul node and returns its output; ``b.Split(x, num_outputs=2, _outputs=2)`` returns a tuple.
    """

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.taken = all_names(graph)
        self._counter = itertools.count()
        self._consts: dict[tuple, ir.Value] = {}

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{PREFIX}{hint}_{next(self._counter)}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, *inputs: ir.Value | None, _domain: str = "", _outputs: int = 1, **attrs):
        attrs = {k: _plain(v) for k, v in attrs.items() if v is not None}
        outputs = [ir.Value(name=self.fresh(op_type.lower())) for _ in range(_outputs)]
        node = ir.Node(_domain, op_type, inputs, ir.convenience.convert_attributes(attrs),
                       outputs=outputs, name=self.fresh(op_type))
        self.graph.append(node)
        return outputs[0] if _outputs == 1 else tuple(outputs)

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def const(self, array, dtype=None, hint: str = "const") -> ir.Value:
        """A constant as an initializer; identical small constants are shared."""
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        value = ir.Value(name=self.fresh(hint), const_value=ir.tensor(array),
                         shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        value.const_value.name = value.name
        self.graph.register_initializer(value)
        if key is not None:
            self._consts[key] = value
        return value

    def i64(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), hint="i64")

    def f32(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.float32), hint="f32")
