"""lrpc.passes: rule-assignment passes. Each is `run(graph, carrying, plan, options)` and records rules in the
plan; they run in DESIGN.md's fixed order and a node claimed by an earlier pass is not re-claimed."""

from . import activations, bilinear, linear, norms, softmax

ORDER = (norms.run, activations.run, softmax.run, bilinear.run, linear.run)
