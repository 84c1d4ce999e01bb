"""Issue 14's K axis (docs/design.md, "Many targets: the K axis"): an explainer compiled with `targets=K` explains K targets per
input row in one run. Oracle: the single-target explainer (itself checked against torch autograd in
test_gxi_zoo.py and against the paper's equations in test_attnlrp_reference.py), run once per target."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

import lrpc
from lrpc import models
from lrpc.errors import LrpcError
from oracles import relative_error

FAMILIES = ("llama", "gpt2", "qwen3", "bert", "hf-vit")
# more sequence models, where the K rows are compacted (lrpc/rows.py): the decoder axis of an
# encoder–decoder, a mixture of experts; under the presets only, to keep the suite quick
MORE_FAMILIES = ("gemma3", "t5", "qwen3-moe")
CASES = [pytest.param(name, exporter, preset, id=f"{name}-{exporter}-{preset}")
         for families, presets in ((FAMILIES, ("attnlrp", "cp-lrp", "gxi")), (MORE_FAMILIES, ("attnlrp", "cp-lrp")))
         for name in families for exporter in models.get(name).exporters for preset in presets]


def _inputs(entry, seq, seed=5):
    return {k: v.numpy() for k, v in entry.inputs(2, seq, seed=seed).items()}


def _single_rows(explainer, inputs, target, position):
    """Relevance [batch, K, …] from K single-target runs, one per column."""
    columns = [explainer.explain(inputs, target=target[:, k],
                                 position=None if position is None else position[:, k]).relevance
               for k in range(target.shape[1])]
    return {name: np.stack([c[name] for c in columns], axis=1) for name in columns[0]}


@pytest.mark.parametrize("name,exporter,preset", CASES)
def test_each_row_equals_the_single_target_explainer(name, exporter, preset, zoo_export):
    entry = models.get(name)
    _, proto = zoo_export(name, exporter)
    single = lrpc.Explainer(lrpc.compile(proto, preset=preset))
    many = lrpc.Explainer(lrpc.compile(proto, preset=preset, targets="dynamic"))
    rank = many.meta["rank"]
    # two runs with different K (and sequence lengths) through one session: K is a dynamic dim
    for k, seq in ((3, entry.example_shape[1]), (2, entry.example_shape[1] + 2)):
        inputs = _inputs(entry, seq)
        classes = single.forward(inputs)[entry.output_name].shape[-1]
        target = np.array([[1, classes - 2, 1][:k], [0, 3 % classes, classes - 1][:k]])
        position = np.array([[-1, -1, 1][:k], [1, -2, -1][:k]]) if rank == 3 else None
        got = many.explain(inputs, target=target, position=position)
        ref = _single_rows(single, inputs, target, position)
        assert got.logit.shape == (2, k)
        for attributed, expected in ref.items():
            assert got.relevance[attributed].shape == expected.shape
            assert relative_error(got.relevance[attributed], expected) <= 1e-5, (attributed, k)


# every other zoo family, both exporters: attnlrp and cp-lrp, K = 3 and K = 1 through one dynamic-K explainer,
# a short sequence to keep the suite quick (batch 2: each row its own targets)
REST = [pytest.param(name, exporter, id=f"{name}-{exporter}") for name in models.names()
        if name not in FAMILIES + MORE_FAMILIES for exporter in models.get(name).exporters]


@pytest.mark.parametrize("name,exporter", REST)
def test_every_family_rows_equal_the_single_target_explainer(name, exporter, zoo_export):
    entry = models.get(name)
    _, proto = zoo_export(name, exporter)
    inputs = _inputs(entry, 5, seed=3)
    for preset in ("attnlrp", "cp-lrp"):
        single = lrpc.Explainer(lrpc.compile(proto, preset=preset))
        many = lrpc.Explainer(lrpc.compile(proto, preset=preset, targets="dynamic"))
        classes = single.forward(inputs)[entry.output_name].shape[-1]
        ranked = many.meta["rank"] == 3
        runs = (([[classes - 1, 0, 2], [3, 3, 1]], [[-1, 1, -1], [2, -1, 0]]), ([[1], [4]], [[-2], [-1]]))
        for target, position in runs:
            target = np.array(target) % classes
            position = np.array(position) if ranked else None
            got = many.explain(inputs, target=target, position=position)
            ref = _single_rows(single, inputs, target, position)
            tolerance = 1e-6 if target.shape[1] == 1 else 1e-5
            for attributed, expected in ref.items():
                assert got.relevance[attributed].shape == expected.shape
                assert np.abs(expected).max() > 0, (preset, attributed)
                assert relative_error(got.relevance[attributed], expected) <= tolerance, (preset, attributed, target)


@pytest.mark.parametrize("name", ("llama", "bert"))
def test_k_of_one_equals_the_single_target_explainer(name, zoo_export):
    entry = models.get(name)
    _, proto = zoo_export(name)
    single = lrpc.Explainer(lrpc.compile(proto))
    one = lrpc.Explainer(lrpc.compile(proto, targets=1))
    inputs = _inputs(entry, entry.example_shape[1])
    rank = one.meta["rank"]
    target, position = np.array([[2], [0]]), (np.array([[-1], [1]]) if rank == 3 else None)
    got = one.explain(inputs, target=target, position=position)
    ref = single.explain(inputs, target=target[:, 0], position=None if position is None else position[:, 0])
    for attributed, expected in ref.relevance.items():
        assert got.relevance[attributed].shape == (2, 1) + expected.shape[1:]
        assert relative_error(got.relevance[attributed][:, 0], expected) <= 1e-6
    np.testing.assert_allclose(got.logit[:, 0], ref.logit, rtol=1e-6)


def test_vector_seed_with_targets_is_linear_in_the_seed(zoo_export):
    """A [batch, K, classes] seed: row k equals the single-target explainer's Σ_c seed[k, c]·R(c)."""
    entry = models.get("llama")
    _, proto = zoo_export("llama")
    single = lrpc.Explainer(lrpc.compile(proto))
    many = lrpc.Explainer(lrpc.compile(proto, seed="vector", targets=2))
    inputs = _inputs(entry, entry.example_shape[1])
    classes = single.forward(inputs)[entry.output_name].shape[-1]
    seed = np.zeros((2, 2, classes), np.float32)
    seed[:, 0, 3], seed[:, 1, 4], seed[:, 1, 7] = 1.0, 2.0, -1.0
    got = many.explain(inputs, seed=seed, position=[[-1, 1], [-2, -1]])
    r = lambda t, p: single.explain(inputs, target=[t, t], position=p).relevance["input_ids"]  # noqa: E731
    expected = np.stack([r(3, [-1, -2]), 2 * r(4, [1, -1]) - r(7, [1, -1])], axis=1)
    assert relative_error(got.relevance["input_ids"], expected) <= 1e-5


@pytest.fixture(scope="module")
def llama_k(zoo_export, tmp_path_factory):
    _, proto = zoo_export("llama")
    path = tmp_path_factory.mktemp("k") / "k.onnx"
    lrpc.compile(proto, targets="dynamic", output=path)
    return path


@pytest.mark.parametrize("target,position,message", [
    (np.zeros((2, 0), np.int64), None, "K = 0"),
    ([[1, 2], [3, 4]], [[-1], [-1]], "one position per target"),
    ([[1, 2], [3, 4]], [[-1, 99], [-1, -1]], "position"),
    ([[1, 2], [3, 10 ** 6]], None, "target"),
    ([[1, 2]] * 3, None, "batch=2"),
    (None, None, "target=[batch, K]"),
    ([], None, "K = 0"),
    ("3", None, "must be integer indices shaped [batch, K], got '3'"),
    ([[1.0, 2.0]] * 2, None, "must be integer indices"),
    (7, None, "must be integer indices"),
    (np.ones((2, 2, 1), np.int64), None, "must be integer indices"),
    # the single-target shape [batch] is not read as K targets of every row
    ([3, 4], [-1, -1], "target has shape [2]; this explainer explains K targets per row: give [batch=2, K] "
                       "(one target per row: [[t] for t in target])"),
    ([[1, 2], [3, 4]], [-1, -1], "position has shape [2]"),
    ([[1, 2], [3, 4]], [[-1, 6], [0, 0]], "position 6 (row 0, target 1) is out of range: use -6..5"),
    ([[1, 2], [3, 4]], [[-1, 0], [-7, 0]], "position -7 (row 1, target 0) is out of range: use -6..5"),
    ([[1, 2], [3, 128]], None, "target 128 (row 1, target 1) is out of range: use 0..127"),
    ([[1, -1], [3, 4]], None, "target -1 (row 0, target 1) is out of range: use 0..127"),
])
def test_bad_k_inputs_are_refused_in_one_line(llama_k, target, position, message):
    explainer = lrpc.Explainer(llama_k)
    inputs = _inputs(models.get("llama"), 6)
    with pytest.raises(LrpcError, match=re.escape(message)) as err:
        explainer.explain(inputs, target=target, position=position)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def llama_k_vector(zoo_export, tmp_path_factory):
    _, proto = zoo_export("llama")
    path = tmp_path_factory.mktemp("kv") / "k.onnx"
    lrpc.compile(proto, targets="dynamic", seed="vector", output=path)
    return path


@pytest.mark.parametrize("seed,position,message", [
    (np.ones((2, 128), np.float32), [-1, -1], "seed has shape [2, 128]; this explainer explains K targets per row"),
    (np.ones((2, 3, 129), np.float32), None, "seed has shape [2, 3, 129]; give [batch=2, K, classes=128]"),
    (np.ones((2, 0, 128), np.float32), None, "seed has shape [2, 0, 128]; give [batch=2, K, classes=128] with K ≥ 1"),
    (np.ones((3, 2, 128), np.float32), None, "seed has shape [3, 2, 128]"),
    ("abc", None, "seed must be numbers, got 'abc'"),
    (np.full((2, 2, 128), np.nan, np.float32), None, "seed contains NaN"),
    (np.ones((2, 2, 128), np.float32), [[-1, 9], [0, 0]], "position 9 (row 0, target 1) is out of range"),
    (np.ones((2, 2, 128), np.float32), [[-1], [0]], "one position per target"),
])
def test_bad_k_seeds_are_refused_in_one_line(llama_k_vector, seed, position, message):
    explainer = lrpc.Explainer(llama_k_vector)
    with pytest.raises(LrpcError, match=re.escape(message)) as err:
        explainer.explain(_inputs(models.get("llama"), 6), seed=seed, position=position)
    assert "\n" not in str(err.value)


def test_one_row_takes_a_k_list(llama_k):
    """For a batch of one row, [K] is that row's K targets: the same as [[…]]."""
    explainer = lrpc.Explainer(llama_k)
    inputs = {k: v[:1] for k, v in _inputs(models.get("llama"), 6).items()}
    flat = explainer.explain(inputs, target=[3, 4, 5], position=[-1, 2, 0]).relevance["input_ids"]
    nested = explainer.explain(inputs, target=[[3, 4, 5]], position=[[-1, 2, 0]]).relevance["input_ids"]
    assert flat.shape == (1, 3, 6) and np.array_equal(flat, nested)


def test_a_fixed_k_explainer_refuses_another_k(zoo_export):
    _, proto = zoo_export("bert")
    explainer = lrpc.Explainer(lrpc.compile(proto, targets=2))
    with pytest.raises(LrpcError, match="--targets 2"):
        explainer.explain(_inputs(models.get("bert"), 6), target=[[0, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("feed,check", [
    ({"lrp_target": np.zeros((2, 0), np.int64), "lrp_position": np.zeros((2, 0), np.int64)}, "nonempty"),
    ({"lrp_target": np.ones((2, 2), np.int64), "lrp_position": np.full((2, 3), -1, np.int64)}, "same_shape"),
    ({"lrp_target": np.ones((2, 2), np.int64), "lrp_position": np.array([[-1, 6], [0, 0]])}, "in_range"),
    ({"lrp_target": np.ones((2, 2), np.int64), "lrp_position": np.array([[-1, -7], [0, 0]])}, "in_range"),
    ({"lrp_target": np.array([[1, 128], [0, 0]]), "lrp_position": np.full((2, 2), -1, np.int64)}, "in_range"),
    ({"lrp_target": np.array([[1, -1], [0, 0]]), "lrp_position": np.full((2, 2), -1, np.int64)}, "in_range"),
    ({"lrp_target": np.ones((3, 2), np.int64), "lrp_position": np.full((3, 2), -1, np.int64)}, "same_batch_as_model"),
    ({"lrp_target": np.ones((1, 2), np.int64), "lrp_position": np.full((1, 2), -1, np.int64)}, "same_batch_as_model"),
    ({"lrp_seed": np.ones((2, 0, 128), np.float32), "lrp_position": np.zeros((2, 0), np.int64)}, "lrp_seed_nonempty"),
    ({"lrp_seed": np.ones((1, 2, 128), np.float32), "lrp_position": np.zeros((1, 2), np.int64)},
     "same_batch_as_model"),
    ({"lrp_seed": np.ones((2, 2, 128), np.float32), "lrp_position": np.array([[0, 0], [0, 6]])}, "in_range"),
])
def test_the_graph_checks_k_inputs_itself(llama_k, llama_k_vector, feed, check):
    """A deployed explainer runs without lrpc's Python checks: the graph refuses bad [batch, K] inputs (the
    run fails naming the check), never wrapping a position or broadcasting one row's targets."""
    path = llama_k_vector if "lrp_seed" in feed else llama_k
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = _inputs(models.get("llama"), 6)
    names = {i.name for i in session.get_inputs()}
    with pytest.raises(Exception, match=check):
        session.run(None, {**{k: v for k, v in inputs.items() if k in names}, **feed})


@pytest.mark.parametrize("bad", ("0", "-3", "many"))
def test_bad_targets_option(bad, zoo_export, tmp_path):
    _, proto = zoo_export("bert")
    with pytest.raises(LrpcError, match="--targets"):
        lrpc.compile(proto, targets=bad)
    model = tmp_path / "m.onnx"
    import onnx
    onnx.save(proto, model)
    run = subprocess.run([sys.executable, "-m", "lrpc.cli", "compile", str(model), "-o", str(tmp_path / "e.onnx"),
                          "--targets", bad], capture_output=True, text=True)
    assert run.returncode == 2 and "--targets" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "e.onnx").exists()


def test_lrpc_explain_refuses_a_k_explainer_in_one_line(llama_k):
    run = subprocess.run([sys.executable, "-m", "lrpc.cli", "explain", str(llama_k), "--tokenizer", "toy",
                          "--text", "the cat sat"], capture_output=True, text=True)
    assert run.returncode == 2 and "--targets" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_k_chunks_equal_one_run_and_split_the_runs(zoo_export, tmp_path):
    """target_chunk splits K into runs of at most that many targets (each repeats the forward), for an
    explainer compiled without the in-graph loop over K (tests/test_k_chunks.py: one with it runs once)."""
    _, proto = zoo_export("llama")
    unlooped = tmp_path / "k.onnx"
    lrpc.compile(proto, targets="dynamic", target_chunk=0, output=unlooped)
    inputs = _inputs(models.get("llama"), 6)
    target, position = np.array([[1, 5, 9, 2, 7], [3, 3, 0, 8, 4]]), np.array([[-1, 2, 0, -2, 5], [1, 1, -1, 3, 0]])
    whole = lrpc.Explainer(unlooped, target_chunk=None).explain(inputs, target=target, position=position)
    chunked = lrpc.Explainer(unlooped, target_chunk=2)
    runs = []
    run = chunked._run
    chunked._run = lambda names, feed: runs.append(feed["lrp_target"].shape) or run(names, feed)
    got = chunked.explain(inputs, target=target, position=position)
    assert runs == [(2, 2), (2, 2), (2, 1)]
    for name, expected in whole.relevance.items():
        assert got.relevance[name].shape == expected.shape
        assert relative_error(got.relevance[name], expected) <= 1e-6
    np.testing.assert_allclose(got.logit, whole.logit, rtol=1e-6)
    with pytest.raises(LrpcError, match="target_chunk 0 must be at least 1"):
        lrpc.Explainer(unlooped, target_chunk=0)


@pytest.mark.parametrize("op", ("TopK", "Compress"))
def test_scattering_vjps_keep_the_k_axis(op):
    """TopK (MoE routing) and Compress send ĝ back by scattering: under --targets each K slice scatters
    alone, and every row equals the single-target explainer."""
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
    if op == "TopK":
        nodes = [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=1)]
        inits = [helper.make_tensor("k", TensorProto.INT64, [1], [3])]
    else:
        nodes = [helper.make_node("Compress", ["x", "keep"], ["y"], axis=1)]
        inits = [helper.make_tensor("keep", TensorProto.BOOL, [6], [1, 0, 1, 1, 0, 1])]
    nodes.append(helper.make_node("Mul", ["y", "y"], ["z"]))
    graph = helper.make_graph(nodes, op, [x], [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", None])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    inputs = {"x": np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)}
    single = lrpc.Explainer(lrpc.compile(proto, preset="gxi"))
    many = lrpc.Explainer(lrpc.compile(proto, preset="gxi", targets="dynamic"))
    target = np.array([[0, 2], [1, 0]])
    got = many.explain(inputs, target=target).relevance["x"]
    expected = _single_rows(single, inputs, target, None)["x"]
    assert np.abs(expected).sum(-1).min() > 0   # every target reaches x
    assert relative_error(got, expected) <= 1e-6


def test_index_inputs_given_as_model_inputs_say_where_they_go(llama_k):
    """An .npz (or dict) holding lrp_target / lrp_seed beside the model's inputs: one line saying they are
    given as target= / position= / seed= (--target / --position), not as inputs."""
    inputs = {**_inputs(models.get("llama"), 6), "lrp_target": np.ones((2, 1), np.int64)}
    with pytest.raises(LrpcError, match=re.escape("unknown lrp_target; the model takes input_ids, attention_mask "
                                                  "(targets, positions and seeds are not inputs here")) as err:
        lrpc.Explainer(llama_k).explain(inputs, target=[[1], [2]])
    assert "\n" not in str(err.value)
