"""The bookkeeping of benchmarks/concepts.py on a value whose answer is known in closed form: a linear
value Σ_u w_u f_u of the intervention factors f, where removing the top k units by w leaves Σ w minus the k
largest weights, and keeping only them leaves their sum."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("concepts_benchmark", BENCHMARKS / "concepts.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module     # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_curves_of_a_linear_value():
    bench = load_benchmark()
    assert bench.powers(64) == [0, 1, 2, 4, 8, 16, 32, 64] and bench.powers(96)[-2:] == [64, 96]
    rng = np.random.default_rng(0)
    units = 12
    layer = bench.Layer("linear", "w · f", "mlp.0", units, bench.powers(units))
    samples = [rng.standard_normal(units) for _ in range(3)]
    for w in samples:
        layer.add({"exact": w, "reversed": -w}, lambda f, w=w: float(w @ f))
    summary = layer.summary()
    for i, k in enumerate(layer.ks):
        top = [np.sort(w)[::-1][:k].sum() for w in samples]
        np.testing.assert_allclose(summary["remove_top_k"]["exact"][i], np.mean([w.sum() - t for w, t in
                                                                                  zip(samples, top)]), atol=1e-4)
        np.testing.assert_allclose(summary["keep_only_top_k"]["exact"][i], np.mean(top), atol=1e-4)
    # ranking by the exact contributions removes the most: no ranking has a larger removal AOPC
    assert summary["removal_aopc"]["exact"] > summary["removal_aopc"]["reversed"]
    assert [list(t) for t in layer.top["exact"]] == [list(np.argsort(-w)[:bench.TOP_UNITS]) for w in samples]
