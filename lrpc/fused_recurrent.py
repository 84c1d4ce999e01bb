"""The recurrent ONNX ops (RNN, GRU, LSTM) unrolled over their static sequence length into registry ops
(lrpc.decompose; docs/design.md, "Recurrent ops").

The node stays for the forward; the unrolled steps, read by nothing in the forward, carry the relevance:
each step is MatMuls with the weights, Adds, the gate activations and the gating products, exactly the
ONNX equations (onnx/docs/Operators.md). Under attnlrp the passes treat them as everywhere else: a
product of two carrying operands (a gate times a candidate or a state) is bilinear (the uniform rule) and
a Sigmoid / Tanh starts an activation region (the identity rule), as in a gated MLP.
"""

from __future__ import annotations

import onnx_ir as ir

from lrpc.fused_common import fail, optional_input
from lrpc.graph import attr

# gate count and default activations (f, g, h as the ONNX spec names them) per op
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
_ACTIVATIONS = ("Sigmoid", "Tanh", "Relu")   # those without alpha / beta


def recurrent(node, b, ctx):
    """RNN / GRU / LSTM → [Y, Y_h(, Y_c)] from the unrolled steps of every direction."""
    op = node.op_type
    x, w, r, bias, lens, h0 = (optional_input(node, i) for i in range(6))
    c0, peepholes = (optional_input(node, i) for i in (6, 7)) if op == "LSTM" else (None, None)
    reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(
        _text(attr(node, "direction", "forward")))
    if reverse is None:
        raise fail(node, f"direction '{_text(attr(node, 'direction'))}'")
    names = [_text(a) for a in attr(node, "activations", None) or _DEFAULT_ACTIVATIONS[op] * len(reverse)]
    if unknown := sorted(set(names) - set(_ACTIVATIONS)):
        raise fail(node, f"the activation {unknown[0]}")
    if attr(node, "clip") is not None or attr(node, "input_forget", 0):
        raise fail(node, "the attribute clip or input_forget")
    layout = attr(node, "layout", 0)
    if layout:  # batch first: [B, T, I] and [B, D, H] → the default layout
        x = b.Transpose(x, perm=[1, 0, 2])
        h0, c0 = (b.Transpose(s, perm=[1, 0, 2]) if s is not None else None for s in (h0, c0))
    steps, hidden = b.dim(x, 0), attr(node, "hidden_size") or b.dim(r, 2)
    if not isinstance(steps, int) or not isinstance(hidden, int):
        raise fail(node, "a sequence length or hidden size unknown at compile time")
    per_direction = len(names) // len(reverse)
    outputs = []
    for d, backwards in enumerate(reverse):
        cell = _Cell(b, op, d, hidden, w, r, bias, peepholes, names[d * per_direction:(d + 1) * per_direction],
                     bool(attr(node, "linear_before_reset", 0)))
        outputs.append(cell.unroll(x, steps, backwards, lens, h0, c0))
    y = b.Concat(*[b.Unsqueeze(ys, b.i64([1])) for ys, _, _ in outputs], axis=1)          # [T, D, B, H]
    states = [b.Concat(*[b.Unsqueeze(o[k], b.i64([0])) for o in outputs], axis=0)     # [D, B, H]
              for k in ((1, 2) if op == "LSTM" else (1,))]
    if layout:
        y = b.Transpose(y, perm=[2, 0, 1, 3])
        states = [b.Transpose(s, perm=[1, 0, 2]) for s in states]
    return ([y] + states)[:len(node.outputs)]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Cell:
    """One direction's weights, split per gate, and its step function."""

    def __init__(self, b, op, d, hidden, w, r, bias, peepholes, activations, linear_before_reset):
        self.b, self.op, self.d, self.hidden, self.linear_before_reset = b, op, d, hidden, linear_before_reset
        self.act = [getattr(b, name) for name in activations]
        gates = _GATES[op] * hidden
        self.wt = b.Transpose(b.Gather(w, b.i64(d)))                      # [I, G·H]
        rt = b.Transpose(b.Gather(r, b.i64(d)))                           # [H, G·H]
        self.wb = self.rb = None
        if bias is not None:
            self.wb, self.rb = b.Split(b.Gather(bias, b.i64(d)), b.i64([gates, gates]), _outputs=2)
        if op == "GRU":  # the candidate's recurrence is applied apart from z and r
            self.rt, self.rt_h = b.Split(rt, b.i64([2 * hidden, hidden]), axis=1, _outputs=2)
            if self.rb is not None:
                self.rb, self.rb_h = b.Split(self.rb, b.i64([2 * hidden, hidden]), _outputs=2)
        else:
            self.rt = rt
        self.p = b.Split(b.Gather(peepholes, b.i64(d)), b.i64([hidden] * 3), _outputs=3) \
            if peepholes is not None else None

    def unroll(self, x, steps, backwards, lens, h0, c0):
        b, hidden = self.b, self.hidden
        inputs = b.MatMul(x, self.wt)                                     # X·Wᵀ for every step at once
        if self.wb is not None:
            inputs = b.Add(inputs, self.wb)
        zero = b.Expand(b.scalar(0.0), b.Concat(b.Shape(x, start=1, end=2), b.i64([hidden]), axis=0))
        h = b.Gather(h0, b.i64(self.d)) if h0 is not None else zero
        c = b.Gather(c0, b.i64(self.d)) if c0 is not None else zero
        ys = [None] * steps
        for t in (reversed(range(steps)) if backwards else range(steps)):
            new_h, new_c = self.step(b.Gather(inputs, b.i64(t)), h, c)
            if lens is not None:  # past a row's length its state stays and its output is 0
                active = b.Unsqueeze(b.Less(b.i64(t), b.Cast(lens, to=ir.DataType.INT64)), b.i64([1]))
                ys[t] = b.Where(active, new_h, zero)
                new_h, new_c = b.Where(active, new_h, h), (b.Where(active, new_c, c) if new_c is not None else None)
            else:
                ys[t] = new_h
            h, c = new_h, new_c
        return b.Concat(*[b.Unsqueeze(y, b.i64([0])) for y in ys], axis=0), h, c

    def step(self, xw, h, c):
        """(H_t, C_t) from X_t·Wᵀ + Wb (`xw`, [B, G·H]) and the previous state (C only for LSTM)."""
        b, hidden = self.b, self.hidden
        recurrence = b.MatMul(h, self.rt)
        if self.rb is not None:
            recurrence = b.Add(recurrence, self.rb)
        if self.op == "RNN":
            return self.act[0](b.Add(xw, recurrence)), None
        if self.op == "GRU":
            f, g = self.act
            xz, xr, xh = b.Split(xw, b.i64([hidden] * 3), axis=1, _outputs=3)
            hz, hr = b.Split(recurrence, b.i64([hidden] * 2), axis=1, _outputs=2)
            z, reset = f(b.Add(xz, hz)), f(b.Add(xr, hr))
            if self.linear_before_reset:
                candidate = b.Mul(reset, self._bias_h(b.MatMul(h, self.rt_h)))
            else:
                candidate = self._bias_h(b.MatMul(b.Mul(reset, h), self.rt_h))
            candidate = g(b.Add(xh, candidate))
            return b.Add(b.Mul(b.Sub(b.scalar(1.0), z), candidate), b.Mul(z, h)), None
        f, g, act_h = self.act  # LSTM, gates in the order i, o, f, c
        gi, go, gf, gc = b.Split(b.Add(xw, recurrence), b.i64([hidden] * 4), axis=1, _outputs=4)
        if self.p is not None:
            pi, po, pf = self.p
            gi, gf = b.Add(gi, b.Mul(pi, c)), b.Add(gf, b.Mul(pf, c))
        cell = b.Add(b.Mul(f(gf), c), b.Mul(f(gi), g(gc)))
        if self.p is not None:
            go = b.Add(go, b.Mul(po, cell))
        return b.Mul(f(go), act_h(cell)), cell

    def _bias_h(self, value):
        return value if self.rb is None else self.b.Add(value, self.rb_h)
