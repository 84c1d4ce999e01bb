"""Performance machinery, checked for correctness only (never absolute times): onnxruntime graph
optimisations, the one-row (compact) relevance path, rematerialisation (`--checkpoint`), `lrpc bench`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lrpc
from onnx_builders import all_nodes
from lrpc import models
from lrpc.cli import main
from lrpc.compiler import load
from lrpc.runtime import Explainer

DECODERS = ["llama", "gemma3", "phi3"]


def _explain(path, inputs, threads=1, graph_optimization=True, position=(1, -2)):
    explainer = Explainer(path, threads=threads, graph_optimization=graph_optimization)
    feed = {k: v.numpy() for k, v in inputs.items()}
    return explainer.explain(feed, target=np.array([1, 5]), position=np.array(position))


def _close(a, b, tol=1e-5):
    for name in a.relevance:
        x, y = a.relevance[name], b.relevance[name]
        assert np.abs(x - y).max() <= tol * max(1.0, np.abs(x).max()), name
    for name in a.outputs:
        assert np.abs(a.outputs[name] - b.outputs[name]).max() <= tol * max(1.0, np.abs(a.outputs[name]).max())


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_ort_graph_optimisations_do_not_change_results(name, tmp_path, zoo_export):
    entry = models.get(name)
    _, proto = zoo_export(name, "dynamo", None)
    path = tmp_path / "e.onnx"
    lrpc.compile(proto, output=path)
    inputs = entry.inputs(2, entry.example_shape[1] + 3, seed=7)
    explainer_rank = Explainer(path).meta["rank"]
    position = (1, -2) if explainer_rank == 3 else None
    on = _explain(path, inputs, graph_optimization=True, position=position) if position else \
        Explainer(path).explain({k: v.numpy() for k, v in inputs.items()}, target=np.array([1, 2]))
    off = _explain(path, inputs, graph_optimization=False, position=position) if position else \
        Explainer(path, graph_optimization=False).explain({k: v.numpy() for k, v in inputs.items()},
                                                          target=np.array([1, 2]))
    _close(on, off)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("every", ["auto", "1"])
def test_checkpointed_explainer_equals_plain(name, every, tmp_path, zoo_export):
    entry = models.get(name)
    _, proto = zoo_export(name, "dynamo", None)
    plain, ckpt = tmp_path / "plain.onnx", tmp_path / "ckpt.onnx"
    lrpc.compile(proto, output=plain)
    lrpc.compile(proto, output=ckpt, checkpoint=every)
    recomputed = [n for n in all_nodes(onnx.load(str(ckpt), load_external_data=False).graph) if "remat" in n.name]
    if every == "1":  # 2 layers, a boundary at each: the first layer's forward is recomputed
        assert recomputed
    inputs = entry.inputs(2, entry.example_shape[1] + 2, seed=3)
    _close(_explain(plain, inputs), _explain(ckpt, inputs))
    if every == "1":  # recorded in the metadata; such explainers run without weight pre-packing by default
        meta = Explainer(ckpt).meta
        assert meta["checkpoint"]["segments"] >= 1 and meta["checkpoint"]["requested"] == "1"
        assert Explainer(ckpt).low_memory and not Explainer(plain).low_memory
        assert not Explainer(ckpt, low_memory=False).low_memory


def test_metadata_peek_reads_no_weights(tmp_path, zoo_export):
    from lrpc import contract
    _, proto = zoo_export("llama", "dynamo", None)
    path = tmp_path / "e.onnx"
    lrpc.compile(proto, output=path, checkpoint="1")
    stored = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert contract.peek_metadata(path) == contract.read_metadata(stored)
    assert contract.peek_metadata(tmp_path / "missing.onnx") is None
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff not onnx")
    assert contract.peek_metadata(tmp_path / "junk.onnx") is None


def test_linear_layer_relevance_stores_no_transposed_weights(tmp_path, zoo_export):
    """ĝ_x = ĝ_y · Wᵀ of a constant weight is a Gemm with transB=1, not MatMul(ĝ, Transpose(W)): the
    latter would be constant-folded by onnxruntime into a stored transposed copy of every weight."""
    _, proto = zoo_export("llama", "dynamo", None)
    path = tmp_path / "e.onnx"
    lrpc.compile(proto, output=path)
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    assert not [n.name for n in all_nodes(graph) if n.op_type == "Transpose" and n.input[0] in weights]
    assert any(n.op_type == "Gemm" and n.input[1] in weights for n in all_nodes(graph))


def test_layer_boundaries_one_per_layer(zoo_export):
    from lrpc import contract
    from lrpc.checkpoint import layer_boundaries
    from lrpc.compiler import analyse_and_plan
    _, proto = zoo_export("llama", "dynamo", None)
    ir_model = load(proto)
    _, carrying, _ = analyse_and_plan(ir_model, "attnlrp")
    y = contract.explained_output(ir_model.graph, None)
    starts = layer_boundaries(ir_model.graph, carrying, y)
    assert len(starts) == 2  # the residual stream entering each of the 2 layers
    assert all(v in carrying and v.shape.rank() == 3 for v in starts)


def test_bad_checkpoint_value_is_a_user_error(tmp_path, zoo_export, capsys):
    _, proto = zoo_export("llama", "dynamo", None)
    model = tmp_path / "m.onnx"
    onnx.save(proto, str(model))
    assert main(["compile", str(model), "-o", str(tmp_path / "e.onnx"), "--checkpoint", "many"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e.onnx").exists()


def test_compact_row_path_matches_full_seed_for_every_position(tmp_path, zoo_export):
    """The one-row relevance path (seed at one position) equals what a full-width walk gives: compare
    positions explained one by one with a vector seed over the sequence's rows, via gxi ≡ autograd."""
    entry = models.get("llama")
    module, proto = zoo_export("llama", "dynamo", None)
    path = tmp_path / "e.onnx"
    lrpc.compile(proto, output=path, preset="gxi")
    from oracles import input_x_gradient
    inputs = entry.inputs(2, 9, seed=5)
    for position in ([0, 0], [3, -1], [-1, 4]):
        got = _explain(path, inputs, position=position).relevance["input_ids"]
        ref = input_x_gradient(module, inputs, "input_ids", np.array([1, 5]), np.array(position))
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_bench_cli_smoke(tmp_path, capsys):
    assert main(["bench", "llama", "--seq", "8", "--repeats", "1", "--occlusion", "sample", "--no-memory",
                 "--workdir", str(tmp_path), "--json"]) == 0
    import json
    result = json.loads(capsys.readouterr().out)
    assert set(result["ms"]) == {"forward", "explainer", "torch", "occlusion"}
    assert set(result["ratios"]) == {"explainer/forward", "explainer/forward (cpu)", "torch/explainer",
                                     "occlusion/explainer"}
    assert set(result["cpu_ms"]) == {"forward", "explainer", "torch"}


def test_bench_curve_over_lengths(tmp_path, capsys):
    """Several --seq: one compile, one result per length, then the explainer/forward curve (no times asserted)."""
    assert main(["bench", "llama", "--seq", "8,12", "--repeats", "1", "--occlusion", "off", "--no-memory",
                 "--no-torch", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    curve = out[out.index("explainer / forward by length"):].splitlines()
    assert [line.split()[0] for line in curve[2:]] == ["8", "12"]
    assert "torch" not in out and len(list(tmp_path.glob("*.explainer.onnx"))) == 1


def test_bench_targets_cli_smoke(tmp_path, capsys):
    """`lrpc bench --targets`: per K, the K run next to K single runs and K torch passes (no times asserted)."""
    assert main(["bench", "llama", "--seq", "8", "--repeats", "1", "--targets", "1,3", "--chunk", "2",
                 "--workdir", str(tmp_path), "--json"]) == 0
    import json
    result = json.loads(capsys.readouterr().out)
    assert set(result["targets"]) == {"1", "3"} and result["chunk"] == 2
    for k, row in result["targets"].items():
        assert row["K single runs ms"] == pytest.approx(int(k) * result["ms"]["explainer"])
        assert row["K run / K single runs"] == pytest.approx(row["K run ms"] / row["K single runs ms"])
        assert row["forward constant"] == pytest.approx((row["K run in forwards"] - 1) / int(k))
        cpu = row["K run in forwards (cpu)"]   # the same two forms from CPU-time minima
        assert cpu == pytest.approx(result["cpu_ms"][f"K={k}"] / result["cpu_ms"]["forward"])
        assert row["forward constant (cpu)"] == pytest.approx((cpu - 1) / int(k))
        assert row["K run / K single runs (cpu)"] == pytest.approx(
            result["cpu_ms"][f"K={k}"] / (int(k) * result["cpu_ms"]["explainer"]))
    assert set(result["peak_rss_mb"]) == {"explainer", "K=1", "K=3"}


@pytest.mark.parametrize("args,message", [(["--targets", "0"], "--targets 0 must be at least 1"),
                                          (["--targets", "2,x"], "--targets 'x' must be a whole number"),
                                          (["--seq", "8,0"], "--seq 0 must be at least 1"),
                                          (["--chunk", "2"], "give --targets"),
                                          (["--targets", "2", "--chunk", "-1"], "--chunk -1: give a whole number ≥ 0")])
def test_bench_targets_bad_options(args, message, capsys):
    assert main(["bench", "llama", *args]) == 2
    assert message in capsys.readouterr().err
