"""CRP's conditional relevance (`--conditions`, `Explainer.explain(condition=…)`) against PyTorch oracles.

R(x | unit) propagates from the prediction as usual, multiplies ĝ of the component's tensor c by a one-hot
mask over its units (a head's head_dim columns together) and keeps only the relevance that passes through c.
The oracle takes ĝ_c = ∂s/∂c from autograd (the AttnLRP rule Functions of tests/reference_lrp.py for
attnlrp, plain autograd for gxi) and then ĝ_E = (∂c/∂E)ᵀ (mask ⊙ ĝ_c) with a second autograd call from c to
the embedding output E, so what bypasses c never enters it; R = Σ_hidden E ⊙ ĝ_E.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import lrpc  # noqa: E402
from lrpc.errors import LrpcError  # noqa: E402

from oracles import explained_scalar, relative_error  # noqa: E402
from test_attnlrp_reference import decoder  # noqa: E402,F401  (the tiny AttnLRP reference decoder, exported)
from test_components import taps, zoo_case  # noqa: E402

TOL = 1e-5


def conditional_oracle(run, tap, units: int, unit: int, target, position) -> np.ndarray:
    """Σ_hidden E ⊙ ĝ_E with ĝ flowing only through the input of `tap`, masked to `unit` of `units`;
    `run()` returns (explained output, embedding output E)."""
    seen = {}
    handle = tap.register_forward_pre_hook(lambda _m, args: seen.__setitem__("c", args[0]))
    try:
        y, embedded = run()
    finally:
        handle.remove()
    c = seen["c"]
    mask = torch.zeros(units)
    mask[unit] = 1.0
    mask = mask.repeat_interleave(c.shape[-1] // units)   # a head: its head_dim columns together
    (g_c,) = torch.autograd.grad(explained_scalar(y, target, position), c, retain_graph=True)
    (g_e,) = torch.autograd.grad(c, embedded, g_c * mask)
    return (embedded * g_e).sum(-1).detach().numpy()


def reference_run(model, ids):
    def run():
        embedded = model.embed(torch.from_numpy(ids)).detach().requires_grad_(True)
        return model.from_embeddings(embedded, True), embedded
    return run


def zoo_run(module, inputs):
    def run():
        captured = {}
        table = module.hf_model.get_input_embeddings()
        handle = table.register_forward_hook(lambda _m, _a, out: captured.__setitem__("E", out))
        try:
            y = module(**inputs)
        finally:
            handle.remove()
        return y, captured["E"]
    return run


@pytest.fixture(scope="module")
def conditioned(decoder):
    model, proto, _ = decoder
    ids = np.random.default_rng(3).integers(0, 40, size=(2, 8)).astype(np.int64)
    plain = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads,residual"))
    explainer = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads,residual", conditions="mlp,heads,residual"))
    return model, ids, plain, explainer


def test_all_ones_is_bitwise_the_plain_explainer(conditioned):
    _, ids, plain, explainer = conditioned
    want = plain.explain({"input_ids": ids}, target=[3, 21], position=[1, -3])
    got = explainer.explain({"input_ids": ids}, target=[3, 21], position=[1, -3])
    assert set(got.relevance) == set(want.relevance) and set(got.outputs) == set(want.outputs)
    for key in want.relevance:
        assert np.array_equal(got.relevance[key], want.relevance[key]), key
    for key in want.outputs:
        assert np.array_equal(got.outputs[key], want.outputs[key]), key


@pytest.mark.parametrize("component,unit", [("mlp.0", 5), ("mlp.1", 17), ("heads.0", 1), ("heads.1", 0),
                                            ("residual.1", 3)])
def test_attnlrp_conditional_heatmap_matches_reference(conditioned, component, unit):
    model, ids, plain, explainer = conditioned
    target, position = [3, 21], [1, -3]
    got = explainer.explain({"input_ids": ids}, target=target, position=position, condition={component: unit})
    tapped, heads = taps("ref", model)[component]
    units = heads or got.relevance[component].shape[-1]
    want = conditional_oracle(reference_run(model, ids), tapped, units, unit, target, position)
    assert relative_error(got.relevance["input_ids"], want) <= TOL
    # not vacuous: the condition changes the heatmap, and only the unit keeps relevance at its layer
    unconditional = plain.explain({"input_ids": ids}, target=target, position=position).relevance["input_ids"]
    assert relative_error(got.relevance["input_ids"], unconditional) > 1e-2
    others = np.delete(got.relevance[component], unit, axis=-1)
    assert np.all(others == 0) and np.any(got.relevance[component][:, unit] != 0)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_gxi_conditional_heatmap_matches_autograd(zoo_export, name):
    module, proto, inputs, feed, target, position = zoo_case(zoo_export, name)
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="gxi", conditions="mlp,heads"))
    tapped = taps(name, module)
    for component, unit, units in (("mlp.0", 7, 64), ("heads.1", 2, 4)):
        got = explainer.explain(feed, target=target, position=position, condition={component: unit})
        want = conditional_oracle(zoo_run(module, inputs), tapped[component][0], units, unit, target, position)
        assert relative_error(got.relevance["input_ids"], want) <= TOL, component


def _raw(explainer, ids, masks: dict, bypass: dict) -> np.ndarray:
    """Run the explainer's session with the mask / bypass inputs fed as given (the others default to 1)."""
    feed = {"input_ids": ids, "lrp_target": np.array([3, 21]), "lrp_position": np.array([1, -3])}
    feed.update({f"lrp_mask.{k}": np.asarray(v, np.float32) for k, v in masks.items()})
    feed.update({f"lrp_bypass.{k}": np.asarray(v, np.float32) for k, v in bypass.items()})
    return explainer.session.run(["relevance.input_ids"], feed)[0]


def test_the_mask_split_conserves_the_heatmap(conditioned):
    """Σ over a component's units of R(x | unit) is the relevance through it; with what bypasses it, the
    unconditional heatmap. The residual stream is a cut of the graph: its heatmaps alone sum to it."""
    _, ids, plain, explainer = conditioned
    unconditional = _raw(plain, ids, {}, {})
    for component, units in (("mlp.0", 24), ("heads.1", 2), ("residual.2", 16)):
        through = sum(explainer.explain({"input_ids": ids}, target=[3, 21], position=[1, -3],
                                        condition={component: u}).relevance["input_ids"] for u in range(units))
        np.testing.assert_allclose(through, _raw(explainer, ids, {component: np.ones(units)}, {component: 0.0}),
                                   rtol=1e-5, atol=1e-7)
        bypassing = _raw(explainer, ids, {component: np.zeros(units)}, {component: 1.0})
        np.testing.assert_allclose(through + bypassing, unconditional, rtol=1e-5, atol=1e-7)
        if component.startswith("residual"):
            assert np.all(bypassing == 0)
            np.testing.assert_allclose(through, unconditional, rtol=1e-5, atol=1e-7)
        else:
            assert np.abs(bypassing).max() > 1e-3 * np.abs(unconditional).max()


def test_bad_conditions_are_one_line(conditioned):
    _, ids, plain, explainer = conditioned
    args = dict(target=[3, 21], position=[1, -3])
    with pytest.raises(LrpcError, match=r"no conditional relevance input 'lrp_mask.mlp.7': this explainer has "):
        explainer.explain({"input_ids": ids}, condition={"mlp.7": 0}, **args)
    with pytest.raises(LrpcError, match=r"condition unit \[24\] out of range"):
        explainer.explain({"input_ids": ids}, condition={"mlp.0": 24}, **args)
    units = explainer.scales["lrp_mask.mlp.0"].shape[0]
    with pytest.raises(LrpcError, match=r"condition mask .lrp_mask.mlp.0. contains ±Inf"):
        explainer.explain({"input_ids": ids}, condition={"mlp.0": np.full(units, np.inf)}, **args)
    with pytest.raises(LrpcError, match="compile it with --conditions"):
        plain.explain({"input_ids": ids}, condition={"mlp.0": 0}, **args)


@pytest.mark.parametrize("option", [{"targets": 2}, {"checkpoint": 1}], ids=["targets", "checkpoint"])
def test_conditions_with_targets_and_checkpoint(decoder, conditioned, option):
    """The masks compose with the K axis and with rematerialised segments: the same conditional heatmaps."""
    model, proto, _ = decoder
    _, ids, _, explainer = conditioned
    other = lrpc.Explainer(lrpc.compile(proto, conditions="mlp,heads,residual", **option))
    for component, unit in (("mlp.1", 4), ("heads.0", 1)):
        want = explainer.explain({"input_ids": ids}, target=[3, 21], position=[1, -3], condition={component: unit})
        if "targets" in option:
            got = other.explain({"input_ids": ids}, target=[[3, 0], [21, 5]], position=[[1, 0], [-3, 2]],
                                condition={component: unit}).relevance["input_ids"][:, 0]
        else:
            got = other.explain({"input_ids": ids}, target=[3, 21], position=[1, -3],
                                condition={component: unit}).relevance["input_ids"]
        assert relative_error(got, want.relevance["input_ids"]) <= TOL, component


def test_compile_command_adds_the_mask_inputs(decoder, tmp_path):
    import onnx

    from lrpc.cli import main
    onnx.save(decoder[1], tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "e.onnx"), "--conditions", "heads"]) == 0
    names = {i.name for i in onnx.load(tmp_path / "e.onnx").graph.input}
    assert {"lrp_mask.heads.0", "lrp_bypass.heads.0", "lrp_mask.heads.1", "lrp_bypass.heads.1"} <= names
    assert not any(n.startswith("lrp_mask.mlp") for n in names)


def _explain_cli(tmp_path, proto, *args):
    """`lrpc explain` on the exported model (its own cache folder), stdout's JSON and stderr."""
    if not (tmp_path / "m.onnx").exists():
        onnx.save(proto, tmp_path / "m.onnx")
    env = {**os.environ, "LRPC_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "lrpc.cli", "explain", str(tmp_path / "m.onnx"), *map(str, args)],
                         capture_output=True, text=True, env=env)
    return run.returncode, json.loads(run.stdout) if run.returncode == 0 else None, run.stderr


def test_explain_command_conditions(decoder, tmp_path):
    """`lrpc explain --conditions C.L=U`: the conditional heatmap of each input, equal to the reference's
    autograd through that unit alone (the oracle of the tests above), and to the Python API for several
    components and for --top-k (one K run)."""
    model, proto, _ = decoder
    ids = np.random.default_rng(3).integers(0, 40, size=(2, 8)).astype(np.int64)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    rc, docs, err = _explain_cli(tmp_path, proto, "--input", tmp_path / "ids.npz", "--target", 3, "--position", 1,
                                 "--conditions", "mlp.1=17", "--json")
    assert rc == 0, err
    tapped, _ = taps("ref", model)["mlp.1"]
    want = conditional_oracle(reference_run(model, ids), tapped, 24, 17, [3, 3], [1, 1])
    got = np.array([d["relevance"] for d in docs])
    assert relative_error(got, want) <= TOL
    assert all("through mlp.1=17 alone" in d["target_label"] for d in docs)
    explainer = lrpc.Explainer(lrpc.compile(proto, seed="vector", conditions="heads,mlp"))
    condition = {"mlp.0": 5, "heads.1": 1}
    rc, docs, err = _explain_cli(tmp_path, proto, "--input", tmp_path / "ids.npz", "--top-k", 2,
                                 "--conditions", "mlp.0=5,heads.1=1", "--json")
    assert rc == 0, err
    for d in docs:
        seed = np.zeros((1, 40), np.float32)
        seed[0, d["target"]] = 1.0
        ref = explainer.explain({"input_ids": ids[d["index"]:d["index"] + 1]}, seed=seed, position=[-1],
                                condition=condition)
        assert relative_error(np.array(d["relevance"]), ref.relevance["input_ids"][0]) <= TOL


@pytest.mark.parametrize("args,message", [
    (("--conditions", "mlp.1"), "give COMPONENT.LAYER=UNIT"),
    (("--conditions", "ffn.1=2"), "give COMPONENT.LAYER=UNIT"),
    (("--conditions", "mlp.1=-2"), "give COMPONENT.LAYER=UNIT"),
    (("--conditions", "mlp.1=2,mlp.1=3"), "names mlp.1 twice"),
    (("--conditions", "mlp.7=0"), "no conditional relevance input 'lrp_mask.mlp.7': this explainer has mlp.0, mlp.1"),
    (("--conditions", "mlp.0=24"), r"condition unit \[24\] out of range \(use 0..23\)"),
    (("--conditions", "mlp.0=1", "--generate", "2"), "--conditions explains"),
])
def test_explain_command_bad_conditions_are_one_line(decoder, tmp_path, args, message):
    _, proto, _ = decoder
    np.savez(tmp_path / "ids.npz", input_ids=np.ones((1, 4), np.int64))
    rc, _, err = _explain_cli(tmp_path, proto, "--input", tmp_path / "ids.npz", *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
