"""lrpc.passes: rule-assignment passes (norms -> activations -> softmax -> bilinear -> linear)."""
