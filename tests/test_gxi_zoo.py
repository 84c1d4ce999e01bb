"""Issue 2's acceptance: for every zoo family and exporter, `--preset gxi` equals torch autograd's
Input×Gradient (≤ 1e-4 relative) at batch 2, for two sequence lengths through one explainer file and
positions other than the last, and the explainer's own outputs equal the model's (≤ 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lrpc
from lrpc import models
from oracles import input_x_gradient, relative_error

EXPORTS = [(name, exporter, opset) for name in models.names() for exporter, opset in
           (("dynamo", None), ("dynamo", 18), ("legacy", 17)) if exporter in models.get(name).exporters]


@pytest.mark.parametrize("name,exporter,opset", EXPORTS, ids=[f"{n}-{e}{o or ''}" for n, e, o in EXPORTS])
def test_gxi_equals_autograd(name, exporter, opset, tmp_path, zoo_export):
    entry = models.get(name)
    module, proto = zoo_export(name, exporter, opset)
    path = tmp_path / "explainer.onnx"
    lrpc.compile(proto, preset="gxi", output=path)
    explainer = lrpc.Explainer(path)
    rank = explainer.meta["rank"]
    for batch, seq, seed in ((2, entry.example_shape[1], 1234), (2, entry.example_shape[1] + 4, 99)):
        inputs = entry.inputs(batch, seq, seed=seed)
        with torch.no_grad():
            expected = module(**inputs).numpy()
        classes = expected.shape[-1]
        target = np.array([1, classes - 2])
        position = np.array([1, -2]) if rank == 3 else None
        result = explainer.explain({k: v.numpy() for k, v in inputs.items()}, target=target, position=position)
        out = result.outputs[entry.output_name]
        assert np.abs(out - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
        for attributed in entry.attributed:
            ref = input_x_gradient(module, inputs, attributed, target, position)
            got = result.relevance[attributed]
            assert got.shape == ref.shape
            assert relative_error(got, ref) <= 1e-4, (attributed, batch, seq, relative_error(got, ref))
