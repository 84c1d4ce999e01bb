"""Components (`--components`) and interventions (`--intervene`) against PyTorch oracles.

Unit relevance is x ⊙ ĝ of the component's tensor. The oracle taps the same tensor in torch as the input
of the layer that reads it (a forward pre-hook on the output projection, the MLP's down projection, the
next norm) and takes ĝ from autograd: plain autograd for gxi on the Hugging Face zoo models, and the
AttnLRP rule Functions of tests/reference_lrp.py for attnlrp. Reshapes between the ONNX tensor and the
tapped one are bijections, so the per-unit sums agree. Interventions are checked against the torch model
with the same units zeroed by a forward pre-hook.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import lrpc  # noqa: E402
from lrpc import models  # noqa: E402
from lrpc.cli import main  # noqa: E402
from lrpc.errors import LrpcError  # noqa: E402

from oracles import relative_error  # noqa: E402
from test_attnlrp_reference import decoder  # noqa: E402,F401  (the tiny AttnLRP reference decoder, exported)

TOL = 1e-5
HEADS = {"gpt2": 4, "llama": 4, "bert": 4}


def taps(name: str, module) -> dict[str, tuple]:
    """component name → (torch module whose first input is the component's tensor, heads or None)."""
    if name == "gpt2":
        blocks, last = module.hf_model.transformer.h, module.hf_model.transformer.ln_f
        mlp, heads, mid, first = "mlp.c_proj", "attn.c_proj", "ln_2", "ln_1"
    elif name == "llama":
        blocks, last = module.hf_model.model.layers, module.hf_model.model.norm
        mlp, heads, mid, first = "mlp.down_proj", "self_attn.o_proj", "post_attention_layernorm", "input_layernorm"
    elif name == "bert":
        blocks, last = module.hf_model.bert.encoder.layer, None
        mlp, heads, mid, first = "output.dense", "attention.output.dense", "attention.output.LayerNorm", None
    else:  # the reference TinyDecoder
        blocks, last = module.layers, module.norm
        mlp, heads, mid, first = "mlp.down", "attn.o", "norm2", "norm1"
    n_heads = HEADS[name] if name in HEADS else blocks[0].attn.heads
    found = {}
    for i, block in enumerate(blocks):
        found[f"mlp.{i}"] = (block.get_submodule(mlp), None)
        found[f"heads.{i}"] = (block.get_submodule(heads), n_heads)
        found[f"residual.{2 * i}"] = (block.get_submodule(mid), None)
        after = (blocks[i + 1].get_submodule(first) if first else None) if i + 1 < len(blocks) else last
        if name == "bert":
            after = block.get_submodule("output.LayerNorm")
        found[f"residual.{2 * i + 1}"] = (after, None)
    return found


def per_unit(x: torch.Tensor, heads: int | None) -> np.ndarray:
    """[batch, positions, units] → [batch, units] summed over positions; heads: [batch, heads] over head_dim too."""
    if heads is not None:
        x = x.reshape(*x.shape[:2], heads, -1).sum(-1)
    return x.sum(1).detach().numpy()


def torch_unit_relevance(run, tapped: dict[str, tuple], target, position) -> dict[str, np.ndarray]:
    """x ⊙ ĝ per unit of every tapped tensor; `run()` returns the explained output."""
    seen, handles = {}, []
    for key, (module, _) in tapped.items():
        handles.append(module.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args[0])))
    try:
        y = run()
    finally:
        for h in handles:
            h.remove()
    from oracles import explained_scalar
    keys = list(seen)
    grads = torch.autograd.grad(explained_scalar(y, target, position), [seen[k] for k in keys])
    return {k: per_unit(seen[k] * g, tapped[k][1]) for k, g in zip(keys, grads)}


def zoo_case(zoo_export, name, exporter="dynamo"):
    module, proto = zoo_export(name, exporter)
    inputs = models.get(name).inputs(2, 6, seed=11)
    feed = {k: v.numpy() for k, v in inputs.items()}
    causal = name != "bert"
    target, position = ([5, 17], [2, -1]) if causal else ([0, 2], None)
    return module, proto, inputs, feed, target, position


# ---- Stage A: unit relevance -------------------------------------------------------------------------

@pytest.mark.parametrize("name,exporter", [("gpt2", "dynamo"), ("llama", "dynamo"), ("bert", "dynamo"),
                                           ("gpt2", "legacy")])
def test_gxi_unit_relevance_matches_autograd(zoo_export, name, exporter):
    module, proto, inputs, feed, target, position = zoo_case(zoo_export, name, exporter)
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="gxi", components="mlp,heads,residual"))
    got = explainer.explain(feed, target=target, position=position)
    tapped = taps(name, module)
    want = torch_unit_relevance(lambda: module(**inputs), tapped, target, position)
    assert set(want) == {k for k in got.relevance if k != "input_ids"}
    for key, ref_value in want.items():
        assert got.relevance[key].shape == ref_value.shape, key
        assert relative_error(got.relevance[key], ref_value) <= TOL, key


def test_attnlrp_unit_relevance_matches_reference(decoder):
    model, proto, _ = decoder
    ids = np.random.default_rng(3).integers(0, 40, size=(2, 8)).astype(np.int64)
    target, position = [3, 21], [1, -3]
    explainer = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads,residual"))
    got = explainer.explain({"input_ids": ids}, target=target, position=position)
    want = torch_unit_relevance(lambda: model(torch.from_numpy(ids), True), taps("ref", model), target, position)
    for key, ref_value in want.items():
        assert relative_error(got.relevance[key], ref_value) <= TOL, key
    plain = torch_unit_relevance(lambda: model(torch.from_numpy(ids), False), taps("ref", model), target, position)
    assert relative_error(plain["mlp.0"], want["mlp.0"]) > 1e-2   # the rules matter: not a vacuous check


def test_per_position_and_targets_sum_to_per_unit(zoo_export):
    _, proto, _, feed, target, position = zoo_case(zoo_export, "llama")
    per_unit_run = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads")).explain(
        feed, target=target, position=position)
    k_run = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads", components_per_position=True,
                                        targets=2)).explain(
        feed, target=[[target[0], 1], [target[1], 2]], position=[[position[0], 0], [position[1], 1]])
    for key in ("mlp.0", "heads.1"):
        assert k_run.relevance[key].shape[:3] == (2, 2, 6)
        np.testing.assert_allclose(k_run.relevance[key][:, 0].sum(1), per_unit_run.relevance[key],
                                   rtol=1e-5, atol=1e-7)


def test_plan_and_diff_list_components(zoo_export, tmp_path, capsys):
    _, proto = zoo_export("gpt2")
    onnx.save(proto, tmp_path / "gpt2.onnx")
    assert main(["plan", str(tmp_path / "gpt2.onnx"), "--components", "mlp,heads,residual"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.split("components:\n")[1].splitlines()]
    assert [(row[0], int(row[1])) for row in listed] == [("mlp.0", 64), ("mlp.1", 64), ("heads.0", 4), ("heads.1", 4)] + [
        (f"residual.{i}", 32) for i in range(4)]
    assert main(["plan", str(tmp_path / "gpt2.onnx"), "--components", "mlp", "--format", "json",
                 "-o", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "plan.json"), str(tmp_path / "gpt2.onnx"), "--components", "mlp"]) == 0
    assert main(["diff", str(tmp_path / "plan.json"), str(tmp_path / "gpt2.onnx"), "--components", "heads"]) == 1
    assert "components:" in capsys.readouterr().out


def test_unknown_selector_is_one_line(zoo_export, tmp_path, capsys):
    onnx.save(zoo_export("gpt2")[1], tmp_path / "gpt2.onnx")
    assert main(["compile", str(tmp_path / "gpt2.onnx"), "-o", str(tmp_path / "e.onnx"), "--components", "mlp,neurons"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown component selector 'neurons'" in err
    assert not (tmp_path / "e.onnx").exists()


# ---- Stage B: interventions ----------------------------------------------------------------------------

def zeroing_hooks(tapped: dict[str, tuple], zeroed: dict[str, int]):
    """Forward pre-hooks that zero one unit (a column, or a head's block of columns) of each tapped input."""
    handles = []
    for key, unit in zeroed.items():
        module, heads = tapped[key]

        def hook(_m, args, unit=unit, heads=heads):
            x = args[0].clone()
            width = x.shape[-1] // heads if heads else 1
            x[..., unit * width:(unit + 1) * width] = 0
            return (x, *args[1:])
        handles.append(module.register_forward_pre_hook(hook))
    return handles


def ablation(name, module, inputs, zeroed: dict[str, int]) -> tuple[dict, np.ndarray]:
    """(scale inputs that zero each unit of `zeroed`, the torch model's output with those units zeroed)."""
    scales = {}
    for key, unit in zeroed.items():
        scales[key] = np.ones(64 if key.startswith("mlp") else 4, np.float32)
        scales[key][unit] = 0.0
    handles = zeroing_hooks(taps(name, module), zeroed)
    try:
        with torch.no_grad():
            return scales, module(**inputs).numpy()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_scales_of_one_are_bitwise_and_zero_matches_torch(zoo_export, name):
    module, proto, inputs, feed, target, position = zoo_case(zoo_export, name)
    plain = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads")).explain(feed, target=target, position=position)
    explainer = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads", intervene="mlp,heads"))
    ones = explainer.explain(feed, target=target, position=position)
    for key in plain.relevance:
        assert np.array_equal(plain.relevance[key], ones.relevance[key]), key
    for key in plain.outputs:
        assert np.array_equal(plain.outputs[key], ones.outputs[key]), key

    scales, want = ablation(name, module, inputs, {"mlp.0": 7, "heads.1": 2})
    got = explainer.explain(feed, target=target, position=position, scales=scales)
    assert relative_error(got.outputs["logits"], want) <= TOL
    assert relative_error(got.outputs["logits"], plain.outputs["logits"]) > 1e-4   # the ablation changed something
    # the relevance pass sees the scaled model: the switched-off units get exactly none
    assert np.all(got.relevance["mlp.0"][:, 7] == 0) and np.all(got.relevance["heads.1"][:, 2] == 0)


def test_gxi_relevance_of_the_scaled_model(zoo_export):
    module, proto, inputs, feed, target, position = zoo_case(zoo_export, "llama")
    explainer = lrpc.Explainer(lrpc.compile(proto, preset="gxi", components="mlp", intervene="mlp"))
    scale = np.linspace(0.0, 2.0, 64).astype(np.float32)
    got = explainer.explain(feed, target=target, position=position, scales={"mlp.1": scale})
    tapped = taps("llama", module)
    down = tapped["mlp.1"][0]
    handle = down.register_forward_pre_hook(lambda _m, args: (args[0] * torch.from_numpy(scale),))
    try:
        want = torch_unit_relevance(lambda: module(**inputs), {"mlp.0": tapped["mlp.0"]}, target, position)
    finally:
        handle.remove()
    assert relative_error(got.relevance["mlp.0"], want["mlp.0"]) <= TOL


def test_unknown_scale_name_is_one_line(zoo_export):
    _, proto, _, feed, target, position = zoo_case(zoo_export, "gpt2")
    explainer = lrpc.Explainer(lrpc.compile(proto, intervene="heads"))
    with pytest.raises(LrpcError, match="no intervention input 'lrp_scale.mlp.0'"):
        explainer.explain(feed, target=target, position=position, scales={"mlp.0": np.ones(64, np.float32)})


@pytest.mark.parametrize("option", [{"targets": 2}, {"checkpoint": 1}], ids=["targets", "checkpoint"])
def test_interventions_with_targets_and_checkpoint(zoo_export, option):
    """--intervene composes with --targets (the K axis) and --checkpoint (rematerialised forward segments):
    all factors 1 are bitwise the explainer without --intervene; factors 0 give the torch model with those
    units zeroed, and the relevance equals the plain intervened explainer's with the same factors."""
    module, proto, inputs, feed, target, position = zoo_case(zoo_export, "gpt2")
    plain = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads", **option))
    explainer = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads", intervene="mlp,heads", **option))
    k = "targets" in option
    args = dict(target=[[t, 1] for t in target], position=[[p, 0] for p in position]) if k else \
        dict(target=target, position=position)
    want, ones = plain.explain(feed, **args), explainer.explain(feed, **args)
    for key in want.relevance:
        assert np.array_equal(want.relevance[key], ones.relevance[key]), key
    for key in want.outputs:
        assert np.array_equal(want.outputs[key], ones.outputs[key]), key

    scales, torch_logits = ablation("gpt2", module, inputs, {"mlp.1": 3, "heads.0": 1})
    got = explainer.explain(feed, **args, scales=scales)
    assert relative_error(got.outputs["logits"], torch_logits) <= TOL
    assert relative_error(got.outputs["logits"], want.outputs["logits"]) > 1e-4
    single = lrpc.Explainer(lrpc.compile(proto, components="mlp,heads", intervene="mlp,heads")).explain(
        feed, target=target, position=position, scales=scales)
    for key in single.relevance:
        mine = got.relevance[key][:, 0] if k else got.relevance[key]
        assert relative_error(mine, single.relevance[key]) <= TOL, key
