"""The in-graph loop over chunks of K (lrpc/k_chunks.py, docs/design.md "Many targets: the K axis"): an
explainer compiled with `target_chunk=C` runs the relevance pass in a Loop over chunks of at most C targets
after one forward. Oracle: the same explainer compiled with `target_chunk=0` (no loop), whose rows are
checked against the single-target explainer in test_targets.py, and for the causal-block branch the plain
explainer (test_causal_blocks.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrpc
from lrpc import contract, models
from lrpc.errors import LrpcError
from onnx_builders import all_nodes, masked_attention_model
from oracles import relative_error


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, feed):
    names = {i.name for i in session.get_inputs()}
    return dict(zip([o.name for o in session.get_outputs()],
                    session.run(None, {k: v for k, v in feed.items() if k in names})))


def _equal(got: dict, want: dict, tolerance=1e-6, blocked=False):
    """blocked: `got` ran the causal blocks' forward, which sums in another order than `want`'s."""
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        if name.startswith(contract.RELEVANCE_PREFIX):
            assert np.abs(expected).sum() > 0, name   # a relevance that could differ
            assert relative_error(got[name], expected) <= tolerance, name
        elif blocked:
            assert relative_error(got[name], expected) <= tolerance, name
        else:   # the forward runs outside the loop, untouched
            np.testing.assert_array_equal(got[name], expected)


def _targets(k, classes, seq, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, (2, k)), rng.integers(-seq, seq, (2, k))


@pytest.mark.parametrize("name,exporter,preset", [("llama", "dynamo", "attnlrp"), ("llama", "legacy", "cp-lrp"),
                                                  ("gpt2", "dynamo", "attnlrp"), ("qwen3", "dynamo", "attnlrp")])
def test_loop_equals_one_k_wide_pass(zoo_export, name, exporter, preset):
    """K = 1, K < C, K = C, K not a multiple of C and K = 3C through one session (K is dynamic)."""
    entry = models.get(name)
    _, proto = zoo_export(name, exporter)
    looped = lrpc.compile(proto, preset=preset, targets="dynamic", target_chunk=3, causal_blocks=0)
    assert [n.op_type for n in looped.graph.node].count("Loop") == 1
    whole, chunked = _session(lrpc.compile(proto, preset=preset, targets="dynamic", target_chunk=0,
                                           causal_blocks=0)), _session(looped)
    inputs = {k: v.numpy() for k, v in entry.inputs(2, 7, seed=1).items()}
    classes = whole.get_outputs()[0].shape[-1]
    for k in (1, 2, 3, 5, 9):
        target, position = _targets(k, classes, 7, seed=k)
        feed = {**inputs, "lrp_target": target, "lrp_position": position}
        _equal(_run(chunked, feed), _run(whole, feed))


def test_fixed_k_and_vector_seed(zoo_export):
    """--targets 5 with chunks of 2 (the last chunk padded), and a seed vector, equal the unlooped explainer."""
    _, proto = zoo_export("llama")
    inputs = {k: v.numpy() for k, v in models.get("llama").inputs(2, 6, seed=2).items()}
    target, position = _targets(5, 128, 6)
    looped = lrpc.compile(proto, targets=5, target_chunk=2, causal_blocks=0)
    session = _session(looped)
    assert [i.shape for i in session.get_inputs() if i.name.startswith("lrp_")] == [["batch", 5]] * 2
    assert session.get_outputs()[1].shape == ["batch", 5, "sequence"]
    feed = {**inputs, "lrp_target": target, "lrp_position": position}
    _equal(_run(session, feed), _run(_session(lrpc.compile(proto, targets=5, target_chunk=0)), feed))
    seed = np.random.default_rng(4).normal(size=(2, 5, 128)).astype(np.float32)
    feed = {**inputs, "lrp_seed": seed, "lrp_position": position}
    _equal(_run(_session(lrpc.compile(proto, seed="vector", targets="dynamic", target_chunk=2)), feed),
           _run(_session(lrpc.compile(proto, seed="vector", targets="dynamic", target_chunk=0)), feed))
    # K ≤ C at compile time: no loop is made
    assert "Loop" not in {n.op_type for n in lrpc.compile(proto, targets=2, target_chunk=2).graph.node}


def test_loop_in_both_causal_block_branches(zoo_export):
    """With causal blocks each branch of the If loops over K; both equal the unlooped explainer."""
    _, proto = zoo_export("llama")
    inputs = {k: v.numpy() for k, v in models.get("llama").inputs(2, 12, seed=3).items()}
    inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
    looped = lrpc.compile(proto, targets="dynamic", target_chunk=2, causal_min_tokens=4)
    branches = next(n for n in looped.graph.node if n.op_type == "If").attribute
    assert [[n.op_type for n in b.g.node].count("Loop") for b in branches] == [1, 1]
    whole = _session(lrpc.compile(proto, targets="dynamic", target_chunk=0, causal_blocks=0))
    for length in (12, 3):   # the blocked branch, then the plain one (shorter than causal_min_tokens)
        feed = {k: v[:, :length] for k, v in inputs.items()}
        target, position = _targets(5, 128, length, seed=length)
        feed.update(lrp_target=target, lrp_position=position)
        _equal(_run(_session(looped), feed), _run(whole, feed), tolerance=1e-5, blocked=length == 12)


@pytest.mark.parametrize("preset", ["attnlrp", "gxi"])
def test_hand_built_attention_with_blocks(preset):
    """A masked attention layer whose mask is an input, blocked branch taken (causal mask, ≥ 4 tokens)."""
    model = masked_attention_model()
    looped = lrpc.compile(model, preset=preset, attribute=["x"], targets="dynamic", target_chunk=2,
                          causal_min_tokens=4)
    whole = lrpc.compile(model, preset=preset, attribute=["x"], targets="dynamic", target_chunk=0, causal_blocks=0)
    t = 12
    mask = np.where(np.tril(np.ones((t, t))) > 0, 0, -np.inf).astype(np.float32)[None, None].repeat(2, 0)
    x = np.random.default_rng(3).normal(size=(2, t, 8)).astype(np.float32)
    target, position = _targets(3, 5, t, seed=5)
    feed = {"x": x, "mask": mask, "lrp_target": target, "lrp_position": position}
    _equal(_run(_session(looped), feed), _run(_session(whole), feed), tolerance=1e-5, blocked=True)


def test_graph_checks_and_the_runtime_around_the_loop(zoo_export, tmp_path):
    """The input checks run on all K before the loop (K = 0 is refused, not an empty result); the forward
    runs once, outside; lrpc.Explainer runs a looped explainer in one run whatever its target_chunk; the
    metadata records the chunk; the ONNX checker passes."""
    _, proto = zoo_export("llama")
    path = tmp_path / "k.onnx"
    looped = lrpc.compile(proto, targets="dynamic", target_chunk=2, causal_blocks=0, output=path)
    onnx.checker.check_model(looped, full_check=True)
    assert contract.read_metadata({p.key: p.value for p in looped.metadata_props})["target_chunk"] == 2
    loop = next(n for n in looped.graph.node if n.op_type == "Loop")
    body = {n.name for n in loop.attribute[0].g.node}
    assert not any(name.startswith("lrp_check_") for name in body)
    forward = {n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")}
    assert forward and not forward & body and forward <= {n.name for n in all_nodes(looped.graph)}
    inputs = {k: v.numpy() for k, v in models.get("llama").inputs(2, 6).items()}
    session = _session(looped)
    with pytest.raises(Exception, match="lrp_check_lrp_target_nonempty"):
        session.run(None, {**inputs, "lrp_target": np.zeros((2, 0), np.int64),
                           "lrp_position": np.zeros((2, 0), np.int64)})
    explainer = lrpc.Explainer(path, target_chunk=2)
    runs, run = [], explainer._run
    explainer._run = lambda names, feed: runs.append(feed["lrp_target"].shape) or run(names, feed)
    target, position = _targets(5, 128, 6)
    got = explainer.explain(inputs, target=target, position=position)
    assert runs == [(2, 5)]
    want = lrpc.Explainer(lrpc.compile(proto, targets="dynamic", target_chunk=0)).explain(
        inputs, target=target, position=position)
    assert relative_error(got.relevance["input_ids"], want.relevance["input_ids"]) <= 1e-6


@pytest.mark.parametrize("bad", [-1, "x", True, 2.5])
def test_bad_target_chunk_is_refused(zoo_export, bad):
    _, proto = zoo_export("llama")
    with pytest.raises(LrpcError, match="--target-chunk") as err:
        lrpc.compile(proto, targets="dynamic", target_chunk=bad)
    assert "\n" not in str(err.value)


def test_cli_target_chunk(zoo_export, tmp_path):
    _, proto = zoo_export("llama")
    onnx.save(proto, tmp_path / "m.onnx")
    run = subprocess.run([sys.executable, "-m", "lrpc.cli", "compile", str(tmp_path / "m.onnx"), "-o",
                          str(tmp_path / "e.onnx"), "--targets", "dynamic", "--target-chunk", "-3"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--target-chunk" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "e.onnx").exists()
    run = subprocess.run([sys.executable, "-m", "lrpc.cli", "compile", str(tmp_path / "m.onnx"), "-o",
                          str(tmp_path / "e.onnx"), "--targets", "dynamic", "--target-chunk", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert contract.peek_metadata(tmp_path / "e.onnx")["target_chunk"] == 3
