"""lrpc.passes: rule-assignment passes. Each is `run(graph, carrying, plan, preset, options)` and records rules
in the plan, reading its switches from the lrpc.presets.Preset; they run in this fixed order (docs/design.md,
"Pipeline") and a node claimed by an earlier pass is not re-claimed."""

from . import activations, bilinear, linear, norms, softmax

ORDER = (norms.run, activations.run, softmax.run, bilinear.run, linear.run)
