"""Issue 20, the second hostile trial, replayed: what lrpc reads (class 1), options and inputs that make no
sense (class 3), silently wrong numbers (class 4), documented features broken on some models (class 5) and
internal errors that reached users as "unexpected" (class 6). Each case failed on the code before the fix;
the variations are ours. Explainers are run through plain onnxruntime sessions where the point is that
deployed explainers (no lrpc Python checks) are safe."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import lrpc
from lrpc import validate
from lrpc.errors import LrpcError
from onnx_builders import all_nodes, float_model, token_model

def session(proto_or_path) -> ort.InferenceSession:
    source = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def cli(*args, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stderr


def one_line_error(rc, err, *words):
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrpc: error:") and "unexpected" not in err, err
    for word in words:
        assert word.lower() in err.lower(), err


# ---- class 1: reading what it should not ------------------------------------------------------------

SECRET = b"root:x:0:0:secret-bytes-lrpc-must-never-embed\n" * 4  # 184 bytes: more than W3 (8·4·4 = 128)


def _external_proto(folder: Path, location_of_w3: str) -> onnx.ModelProto:
    """token_model saved with external data, loaded WITHOUT it, W3's location pointing elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(token_model(), folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    proto = onnx.load(folder / "m.onnx", load_external_data=False)
    w3 = next(t for t in proto.graph.initializer if t.name == "W3")
    for entry in w3.external_data:
        if entry.key == "location":
            entry.value = location_of_w3
        if entry.key == "offset":
            entry.value = "0"
    return proto


@pytest.fixture()
def secret(tmp_path):
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


@pytest.mark.parametrize("where", ["absolute", "dotdot", "cwd", "plain-relative"])
@pytest.mark.parametrize("api", ["compile", "Attributor", "ir.Model"])
def test_in_memory_proto_without_its_data_is_refused(where, api, tmp_path, secret, monkeypatch):
    """Old: the location was resolved by onnx-ir against the current directory, or read as given
    (an absolute path or ../../ embedded that file's bytes in the explainer)."""
    location = {"absolute": str(secret), "dotdot": "../outside/secret.txt", "cwd": "secret.txt",
                "plain-relative": "m.onnx.data"}[where]
    proto = _external_proto(tmp_path / "model", location)
    monkeypatch.chdir(secret.parent if where == "cwd" else tmp_path / "model")  # a data file is right there
    with pytest.raises(LrpcError, match=r"onnx\.load\(path\)") as info:
        if api == "compile":
            lrpc.compile(proto)
        elif api == "ir.Model":
            lrpc.compile(ir.serde.deserialize_model(proto))
        else:
            lrpc.Attributor(proto, cache=tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_proto_loaded_with_its_data_still_compiles(tmp_path):
    proto = _external_proto(tmp_path / "model", "m.onnx.data")
    for t in proto.graph.initializer:  # back to the honest location and offset
        t.ClearField("external_data")
        t.data_location = TensorProto.DEFAULT
    onnx.save(token_model(), tmp_path / "model" / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    loaded = onnx.load(tmp_path / "model" / "m.onnx")  # reads its data
    assert lrpc.compile(loaded).graph.output


@pytest.mark.parametrize("kind", ["symlink-out", "symlink-in", "symlink-dir-out", "fifo", "absolute", "dotdot"])
def test_external_data_files_must_stay_in_the_model_folder(kind, tmp_path, secret):
    folder = tmp_path / "model"
    location = {"absolute": str(secret), "dotdot": "../outside/secret.txt"}.get(kind, "link/w3.bin"
                                                                               if kind == "symlink-dir-out"
                                                                               else "w3.bin")
    proto = _external_proto(folder, location)
    if kind == "symlink-out":
        (folder / "w3.bin").symlink_to(secret)
    elif kind == "symlink-dir-out":
        (folder / "link").symlink_to(secret.parent)
        (secret.parent / "w3.bin").write_bytes(SECRET)
    elif kind == "symlink-in":  # onnx and onnxruntime refuse links, even inside the folder
        (folder / "real.bin").write_bytes((folder / "m.onnx.data").read_bytes())
        (folder / "w3.bin").symlink_to(folder / "real.bin")
    elif kind == "fifo":
        os.mkfifo(folder / "w3.bin")
    onnx.save(proto, folder / "m.onnx")
    rc, err = cli("compile", folder / "m.onnx", "-o", tmp_path / "e.onnx", timeout=60)
    one_line_error(rc, err, {"fifo": "regular file", "symlink-out": "is a link", "symlink-in": "is a link",
                             "symlink-dir-out": "is a link"}.get(kind, "outside"))
    assert not (tmp_path / "e.onnx").exists()


@pytest.mark.parametrize("source", ["/dev/zero", "fifo", "socket-dir"])
def test_model_files_that_are_not_regular_are_refused_at_once(source, tmp_path):
    """Old: /dev/zero was read without bound and a FIFO blocked forever (the subprocess timeout fails it)."""
    if source == "fifo":
        source = tmp_path / "m.onnx"
        os.mkfifo(source)
    elif source == "socket-dir":
        import socket
        source = tmp_path / "s.onnx"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(source))
    rc, err = cli("compile", source, "-o", tmp_path / "e.onnx", timeout=60)
    one_line_error(rc, err, "not a regular file")
    assert not (tmp_path / "e.onnx").exists()


def test_model_files_beyond_the_cap_are_not_read(tmp_path, monkeypatch):
    from lrpc import loading
    path = tmp_path / "m.onnx"
    onnx.save(token_model(), path)
    monkeypatch.setattr(loading, "MAX_PROTO_BYTES", 100)
    with pytest.raises(LrpcError, match="more than the 100"):
        lrpc.compile(path)


# ---- class 3: options and inputs that make no sense -------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 0.0, "x"])
def test_epsilon_must_be_finite_and_positive(value):
    with pytest.raises(LrpcError, match="--epsilon"):
        validate.rule_options(epsilon=value)


@pytest.mark.parametrize("flag", ["gamma_linear", "gamma_conv"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -5.0, -1e-9])
def test_gammas_must_be_finite_and_not_negative(flag, value):
    with pytest.raises(LrpcError, match="--gamma-"):
        validate.rule_options(**{flag: value})


def test_sensible_rule_options_pass():
    validate.rule_options(epsilon=1e-6, gamma_linear=0.0, gamma_conv=0.25, rule_nodes="^mlp")
    with pytest.raises(LrpcError, match="not a valid regular expression"):
        validate.rule_options(rule_nodes="(")


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "2"])
def test_counts_must_be_whole_and_at_least_one(value):
    with pytest.raises(LrpcError, match="top-k"):
        validate.at_least_one(value, "top-k")
    assert validate.at_least_one(np.int64(4), "top-k") == 4


@pytest.mark.parametrize("opset", [5, 17, 99, 0, 2.0])
def test_export_opset_outside_the_exporters_range(opset):
    with pytest.raises(LrpcError, match="--opset"):
        validate.export_opset(opset, newest=23, oldest=18)
    assert validate.export_opset(20, newest=23, oldest=18) == 20


def _plan(options):
    from lrpc.compiler import analyse_and_plan, load
    return analyse_and_plan(load(float_model()), "attnlrp", None, options)[2]


@pytest.mark.parametrize("layers", ["^no-such-layer$", "Conv"])
def test_layers_matching_nothing_is_an_error(layers):
    from lrpc.presets import Options
    options = Options(gamma_linear=0.25, rule_nodes=layers)
    with pytest.raises(LrpcError, match="--rule-nodes .* matches no linear layer"):
        validate.rule_options_took_effect(_plan(options), options)
    matched = Options(gamma_linear=0.25, rule_nodes=".")
    validate.rule_options_took_effect(_plan(matched), matched)


def test_compile_refuses_bad_rule_options_end_to_end():
    with pytest.raises(LrpcError, match="--epsilon"):
        lrpc.compile(float_model(), epsilon=math.nan)


def test_compile_refuses_layers_matching_nothing_end_to_end():
    with pytest.raises(LrpcError, match="--rule-nodes"):
        lrpc.compile(float_model(), gamma_linear=0.25, rule_nodes="^nothing$")


@pytest.mark.parametrize("name", ["lrp_target", "lrp_mask", "relevance.x"])
def test_model_inputs_with_the_contracts_names_are_refused(name):
    """Old: `lrp_mask` compiled into an explainer whose runtime took it for one of its own inputs."""
    proto = float_model()
    proto.graph.input[0].name = name
    for node in proto.graph.node:
        node.input[:] = [name if i == "x" else i for i in node.input]
    with pytest.raises(LrpcError, match=f"'{name}'.*rename it"):
        lrpc.compile(proto)


def test_an_opset_onnxruntime_cannot_load_is_refused_at_compile():
    proto = float_model()
    proto.opset_import[0].version = 99
    with pytest.raises(LrpcError, match="opset 99.*onnxruntime"):
        lrpc.compile(proto)


SPEC = ["batch", "seq"]


@pytest.mark.parametrize("array, words", [
    (np.array([1, 2, 3]), ["rank 1", "batch axis"]),                     # no batch axis: not 3 one-token rows
    (np.array([[1.5, 2.0]]), ["dtype"]),
    (np.zeros((1, 0), np.int64), ["empty"]),
    (np.array([["a"]]), ["dtype"]),
    (np.array([[2**40]], np.uint64).astype(np.int64) * 2**23, ["range"]),
])
def test_token_input_arrays(array, words):
    with pytest.raises(LrpcError) as info:
        validate.input_array("input_ids", array, np.int32, SPEC)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (1e39, "range")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_input_arrays_must_be_finite_in_float32(bad, word, dtype):
    """NaN and float32 overflow are refused up front; a deliberate ±Inf (an additive −inf mask) passes here
    and the explainer refuses non-finite relevance after the run (test_explainer_refuses_infinite_inputs…)."""
    x = np.ones((2, 6), dtype)
    if dtype == np.float32 and bad == 1e39:
        pytest.skip("1e39 is already Inf in float32: the ±Inf case")
    x[1, 3] = bad
    with pytest.raises(LrpcError, match=word):
        validate.input_array("x", x, np.float32, ["batch", 6])
    x[1, 3] = -np.inf
    assert np.isneginf(validate.input_array("x", x, np.float32, ["batch", 6])[1, 3])
    x[1, 3] = 3.0e38  # large, finite in float32
    assert validate.input_array("x", x, np.float32, ["batch", 6]).dtype == np.float32


@pytest.mark.parametrize("value, size, negative, ok", [
    (3, 4, False, True), (4, 4, False, False), (-1, 4, False, False), (-4, 4, True, True), (-5, 4, True, False),
    ([0, 1], 4, False, True), ([0, 1, 2], 4, False, False), (1.0, 4, False, False),
])
def test_indices(value, size, negative, ok):
    if ok:
        assert validate.indices("target", value, 2, size, negative=negative).shape == (2,)
    else:
        with pytest.raises(LrpcError, match="target"):
            validate.indices("target", value, 2, size, negative=negative)


@pytest.mark.parametrize("seed, word", [([np.inf, 0, 0], "Inf"), ([np.nan, 0, 0], "NaN"), ([1e40, 0, 0], "range"),
                                        ([1.0, 0.0], "columns"), ([[1.0, 0, 0]] * 3, "shape")])
def test_seed_vectors(seed, word):
    with pytest.raises(LrpcError, match=word):
        validate.seed_vector(np.asarray(seed, np.float64), 2, 3)
    assert validate.seed_vector([1.0, 0.0, -1.0], 2, 3).shape == (2, 3)


def test_unknown_target_words_are_refused():
    with pytest.raises(LrpcError, match="not in the tokenizer's vocabulary"):
        validate.known_token("zyzzyva", [3], unknown_id=3)
    with pytest.raises(LrpcError, match="2 tokens"):
        validate.known_token("two words", [5, 6], unknown_id=3)
    assert validate.known_token("cat", [17], unknown_id=3) == 17


def test_rank_names_the_missing_batch_axis():
    with pytest.raises(LrpcError, match="add the batch axis"):
        validate.rank("input_ids", np.array([1, 2, 3]), SPEC)
    validate.rank("input_ids", np.array([[1, 2, 3]]), SPEC)


@pytest.fixture(scope="module")
def attributor(tmp_path_factory):
    return lrpc.Attributor(token_model(), cache=tmp_path_factory.mktemp("cache"))


def test_attributor_refuses_arrays_without_a_batch_axis(attributor):
    """Old: [seq] token ids were split into seq inputs of one token each."""
    with pytest.raises(LrpcError, match="batch axis"):
        attributor.attribute({"input_ids": np.array([1, 2, 3])}, target=0)


def test_attributor_refuses_top_k_zero(attributor):
    with pytest.raises(LrpcError, match="top-k"):
        attributor.attribute({"input_ids": np.array([[1, 2, 3]])}, top_k=0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e39])
def test_explainer_refuses_infinite_inputs_end_to_end(bad, tmp_path):
    """Old: ±Inf (or float64 beyond float32) inputs gave NaN relevance and exit 0."""
    path = tmp_path / "e.onnx"
    lrpc.compile(float_model(), output=path)
    x = np.ones((1, 6), np.float64)
    x[0, 2] = bad
    with pytest.raises(LrpcError, match="Inf|range"):
        lrpc.Explainer(path).explain({"x": x}, target=[0])


# ---- class 4: the explainer graph checks its own inputs (plain onnxruntime) ---------------------------

@pytest.fixture(scope="module")
def token_explainer():
    return session(lrpc.compile(token_model(classes=4)))  # logits [batch, seq, 4]


@pytest.fixture(scope="module")
def vector_explainer():
    return session(lrpc.compile(float_model(classes=3), seed="vector"))


IDS = np.array([[1, 2, 3], [4, 5, 6]])


def _run(sess, target, position):
    return sess.run(None, {"input_ids": IDS, "lrp_target": np.array(target), "lrp_position": np.array(position)})


@pytest.mark.parametrize("target", [[4, 0], [0, 99], [-1, 0], [0, -4], [2**40, 1]])
def test_out_of_range_target_fails_the_run(token_explainer, target):
    """Old: ≥ classes gave all-zero relevance, −1 wrapped to the last class."""
    with pytest.raises(Exception, match="lrp_check_lrp_target_in_range"):
        _run(token_explainer, target, [0, 0])


@pytest.mark.parametrize("position", [[3, 0], [0, -4], [100, 0], [-2**40, 0]])
def test_out_of_range_position_fails_the_run(token_explainer, position):
    """Old: relevance that belongs to no position (all zero)."""
    with pytest.raises(Exception, match="lrp_check_lrp_position_in_range"):
        _run(token_explainer, [0, 1], position)


def test_in_range_indices_at_the_edges_run_and_agree(token_explainer):
    """The edges pass the checks, and a negative position is the same row as its positive twin, bit for bit."""
    high = _run(token_explainer, [3, 0], [2, -3])
    low = _run(token_explainer, [3, 0], [-1, 0])
    for a, b in zip(high, low):
        np.testing.assert_array_equal(a, b)
    assert np.abs(high[-1]).sum() > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_seed_fails_the_run(vector_explainer, bad):
    seed = np.array([[1.0, 0.0, 0.0], [0.0, bad, 1.0]], np.float32)
    with pytest.raises(Exception, match="lrp_check_lrp_seed_finite"):
        vector_explainer.run(None, {"x": np.ones((2, 6), np.float32), "lrp_seed": seed})


def test_the_checks_are_data_dependencies_of_the_relevance():
    """They must survive any optimiser: the relevance is computed from the checked value, not beside it."""
    graph = lrpc.compile(token_model()).graph
    checks = {n.name.rsplit("_", 1)[0]: n for n in graph.node if n.name.startswith("lrp_check_")}
    assert set(checks) == {"lrp_check_lrp_target_in_range", "lrp_check_lrp_position_in_range"}
    readers = {i for n in graph.node for i in n.input}
    assert all(node.output[0] in readers for node in checks.values())
    assert not any(n.op_type == "OneHot" and n.input[0] in ("lrp_target", "lrp_position") for n in graph.node)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_the_checks_leave_valid_results_bit_identical(name, zoo_export, monkeypatch):
    """The explainer with its input checks gives exactly the bits of the same explainer without them."""
    from lrpc import contract, models
    entry = models.get(name)
    _, proto = zoo_export(name, "dynamo", None)
    checked = lrpc.compile(proto)
    monkeypatch.setattr(contract, "checked", lambda b, value, ok, test, subject=None: value)
    unchecked = lrpc.compile(proto)
    assert not any(n.name.startswith("lrp_check_") for n in all_nodes(unchecked.graph))
    feed = {k: v.numpy() for k, v in entry.inputs(2, entry.example_shape[1] + 2, seed=9).items()}
    feed["lrp_target"] = np.array([0, 2])
    if any(i.name == "lrp_position" for i in checked.graph.input):
        feed["lrp_position"] = np.array([-1, 1])
    for a, b in zip(session(checked).run(None, feed), session(unchecked).run(None, feed)):
        assert a.tobytes() == b.tobytes()


# ---- class 4: float16 models keep their forward bit for bit -----------------------------------------

def _float16_token_model() -> onnx.ModelProto:
    """token_model with every weight, the output and the arithmetic in float16 (converted by hand)."""
    proto = token_model(vocab=20, hidden=8, classes=4)
    for i, tensor in enumerate(proto.graph.initializer):
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    return proto


def test_float16_forward_is_bit_identical():
    proto = _float16_token_model()
    explainer = session(lrpc.compile(proto))
    ids = np.array([[1, 7, 3, 9, 11], [4, 5, 6, 19, 0]])
    expected = session(proto).run(None, {"input_ids": ids})[0]
    got = explainer.run(None, {"input_ids": ids, "lrp_target": np.array([1, 2]), "lrp_position": np.array([-1, 2])})
    assert got[0].dtype == np.float16
    np.testing.assert_array_equal(got[0].view(np.uint16), expected.view(np.uint16))
    assert np.isfinite(got[-1]).all() and np.abs(got[-1]).sum() > 0


# ---- class 5: --checkpoint on GPT-2 (both exporters) and ViT ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, exporter", [("gpt2", "dynamo"), ("gpt2", "legacy"), ("hf-vit", "dynamo")])
@pytest.mark.parametrize("every", ["1", "auto"])
def test_checkpoint_on_gpt2_and_vit(name, exporter, every, tmp_path, zoo_export):
    """Old: "Graph contains a cycle" (a Shape of the first residual, read by every layer's relevance
    rules, was cloned behind ĝ of a later boundary)."""
    from lrpc import models
    entry = models.get(name)
    _, proto = zoo_export(name, exporter, None)
    plain, ckpt = lrpc.compile(proto), lrpc.compile(proto, checkpoint=every)
    assert any("remat" in n.name for n in all_nodes(ckpt.graph))
    inputs = {k: v.numpy() for k, v in entry.inputs(2, entry.example_shape[1] + 1, seed=5).items()}
    extra = {"lrp_target": np.array([1, 3])}
    if any(i.name == "lrp_position" for i in plain.graph.input):
        extra["lrp_position"] = np.array([1, -1])
    a, b = (session(p).run(None, {**inputs, **extra}) for p in (plain, ckpt))
    for x, y in zip(a, b):
        assert np.abs(x.astype(np.float64) - y).max() <= 1e-5 * max(1.0, np.abs(x).max())


# ---- class 3 through the CLI: one validation layer, one line, nothing written ------------------------

@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    onnx.save(token_model(), folder / "tokens.onnx")
    onnx.save(float_model(), folder / "floats.onnx")
    return folder


@pytest.mark.parametrize("command", ["compile", "plan"])
@pytest.mark.parametrize("options, word", [
    (["--epsilon", "nan"], "--epsilon"), (["--epsilon", "inf"], "--epsilon"), (["--epsilon", "-1"], "--epsilon"),
    (["--gamma-linear", "inf"], "--gamma-linear"), (["--gamma-linear", "-5"], "--gamma-linear"),
    (["--gamma-conv", "nan"], "--gamma-conv"), (["--rule-nodes", "("], "regular expression"),
    (["--gamma-linear", "0.25", "--rule-nodes", "^nothing$"], "matches no linear layer"),
    (["--epsilon", "1e-6", "--rule-nodes", "no-such-node"], "matches no linear layer"),
    (["--layers", "mlp"], "--rule-nodes 'mlp'"),   # the old name: refused, saying the new one
])
def test_rule_options_that_make_no_sense_on_the_command_line(command, options, word, model_files, tmp_path):
    """Old: NaN / Inf / negative values compiled into NaN or nonsense relevance; --rule-nodes matching nothing
    made --gamma-* a silent no-op."""
    out = tmp_path / ("e.onnx" if command == "compile" else "plan.json")
    rc, err = cli(command, model_files / "floats.onnx", *options, "-o", out)
    one_line_error(rc, err, word)
    assert not out.exists()


@pytest.mark.parametrize("kwargs", [{"epsilon": math.inf}, {"gamma_conv": -1.0}, {"epsilon": 0.0},
                                    {"epsilon": 1e-6, "rule_nodes": "^nothing$"}])
def test_compile_refuses_them_through_the_api_before_writing(kwargs, tmp_path):
    with pytest.raises(LrpcError, match="--epsilon|--gamma|--rule-nodes"):
        lrpc.compile(float_model(), output=tmp_path / "e.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("options, word", [
    (["--top-k", "0"], "--top-k"), (["--top-k", "-2"], "--top-k"), (["--batch-size", "0"], "--batch-size"),
    (["--target", "zyzzyva"], "not in the tokenizer's vocabulary"),
    (["--target", "Zyzzyva"], "not in the tokenizer's vocabulary"),
])
def test_explain_options_that_make_no_sense(options, word, model_files, tmp_path):
    """Old: --top-k 0 was ignored (the predicted class explained); an unknown --target word became [UNK]."""
    rc, err = cli("explain", model_files / "tokens.onnx", "--tokenizer", "toy", "--text", "the cat sat",
                  *options, "--cache", tmp_path / "cache", "--json")
    one_line_error(rc, err, word)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 1)])
def test_explain_input_arrays_of_the_wrong_rank(shape, model_files, tmp_path):
    """Old: [seq] ids became seq inputs of one token each."""
    np.savez(tmp_path / "in.npz", input_ids=np.arange(1, 1 + math.prod(shape)).reshape(shape))
    rc, err = cli("explain", model_files / "tokens.onnx", "--input", tmp_path / "in.npz",
                  "--cache", tmp_path / "cache", "--json")
    one_line_error(rc, err, "input_ids", "rank")


def test_a_known_target_word_still_works(attributor):
    from lrpc.inputs import Tokenizer
    toy = Tokenizer.toy()
    assert toy.token_id("cat") == toy.encode("cat")[0][0] != toy.unknown_id()
    with pytest.raises(LrpcError, match="not in the tokenizer's vocabulary"):
        toy.token_id("zyzzyva")
    assert toy.token_id("[UNK]") == toy.unknown_id()  # asked for by name: not a silent replacement


@pytest.mark.parametrize("flag", ["--steps", "--ig-steps", "--patch", "--limit"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_evaluate_counts_must_be_at_least_one(flag, value, model_files, tmp_path):
    """Old: `evaluate --steps 0` printed zeros."""
    np.savez(tmp_path / "in.npz", x=np.ones((2, 6), np.float32))
    rc, err = cli("evaluate", model_files / "floats.onnx", "--inputs", tmp_path / "in.npz", flag, value,
                  "--json", tmp_path / "m.json")
    one_line_error(rc, err, flag)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("kwargs", [{"ig_steps": 0}, {"ig_steps": 2.5}])
def test_evaluator_refuses_bad_counts_through_the_api(kwargs):
    from lrpc.evaluate import Evaluator
    with pytest.raises(LrpcError, match="--ig-steps"):
        Evaluator(float_model(), **kwargs)


@pytest.mark.parametrize("flag", ["--seq", "--batch", "--repeats", "--threads"])
def test_bench_counts_must_be_at_least_one(flag, model_files):
    rc, err = cli("bench", model_files / "floats.onnx", flag, "0")
    one_line_error(rc, err, flag)


@pytest.mark.parametrize("opset", ["5", "17", "24", "99"])
def test_export_opset_outside_the_range_is_one_line(opset, tmp_path):
    """Old: `export hf --opset 5` printed a traceback, exited 0 and wrote another opset."""
    rc, err = cli("export", "hf", "bert", "-o", tmp_path / "m.onnx", "--opset", opset, timeout=300)
    one_line_error(rc, err, "--opset", "18 to 23")
    assert not list(tmp_path.iterdir())


def test_legacy_exporter_has_its_own_opset_range():
    from lrpc.torch_export import export_onnx
    with pytest.raises(LrpcError, match="from 7 to 20"):
        export_onnx(object(), {"x": 1}, exporter="legacy", opset=23)


# ---- class 2 through the API: an output that is one of compile's inputs -------------------------------

@pytest.mark.parametrize("which", ["model", "data"])
def test_compile_api_refuses_to_write_over_its_input(which, tmp_path):
    """Old: lrpc.compile(path, output=path, force=True) replaced the model (the CLI refused it)."""
    path = tmp_path / "m.onnx"
    onnx.save(token_model(), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    output = path if which == "model" else tmp_path / "m.onnx.data"
    with pytest.raises(LrpcError, match="input"):
        lrpc.compile(path, output=output, force=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---- class 4: cached explainers are checked against their digest --------------------------------------

def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:  # flip one bit of the last weight: the file still parses, the numbers are wrong
        data[-20] ^= 0x40
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip-a-weight-bit", "truncate"])
def test_a_damaged_cached_explainer_is_rebuilt(how, tmp_path, capsys):
    """Old: a corrupted explainer that still parsed was used silently; a truncated one failed forever."""
    from lrpc.cache import compiled_explainer
    path, _ = compiled_explainer(token_model(), cache=tmp_path)
    good = path.read_bytes()
    _damage(path, how)
    again, _ = compiled_explainer(token_model(), cache=tmp_path)
    assert again == path and path.read_bytes() == good
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "digest" in lines[0] and "compiling it again" in lines[0]
    compiled_explainer(token_model(), cache=tmp_path)  # intact now: used as is, nothing said
    assert capsys.readouterr().err == ""


def test_a_cached_explainer_with_a_damaged_sidecar_is_rebuilt(tmp_path):
    from lrpc.cache import compiled_explainer
    path, _ = compiled_explainer(token_model(), cache=tmp_path)
    path.with_suffix(".json").write_text("{not json")
    assert compiled_explainer(token_model(), cache=tmp_path)[1]["digest"]


# ---- class 4: NaN / Inf relevance where the forward is finite ------------------------------------------

@pytest.mark.parametrize("scale", [3e38, 1e38])
def test_non_finite_relevance_from_finite_outputs_is_an_error(scale, tmp_path):
    """A finite seed (3e38 is finite in float32) can still overflow the relevance: an error naming the
    input, not Inf relevance handed back."""
    path = tmp_path / "e.onnx"
    lrpc.compile(float_model(classes=3), output=path, seed="vector")
    explainer = lrpc.Explainer(path)
    x = np.full((1, 6), 10.0, np.float32)
    assert np.isfinite(explainer.forward({"x": x})["y"]).all()
    with pytest.raises(LrpcError, match="relevance of input 'x' is not finite"):
        explainer.explain({"x": x}, seed=[scale, scale, scale])
    assert np.isfinite(explainer.explain({"x": x}, seed=[1.0, 0.0, 0.0]).relevance["x"]).all()


def test_non_finite_relevance_is_an_error_on_the_k_target_path_too(tmp_path):
    """A K explainer (--targets) goes through the same check after its run."""
    path = tmp_path / "e.onnx"
    lrpc.compile(float_model(classes=3), output=path, seed="vector", targets=2)
    explainer = lrpc.Explainer(path)
    x = np.full((1, 6), 10.0, np.float32)
    with pytest.raises(LrpcError, match="relevance of input 'x' is not finite"):
        explainer.explain({"x": x}, seed=[[[3e38] * 3, [1.0, 0.0, 0.0]]])
    assert np.isfinite(explainer.explain({"x": x}, seed=[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).relevance["x"]).all()


# ---- class 5: lrpc bench on an ONNX file --------------------------------------------------------------

@pytest.mark.parametrize("name", ["tokens.onnx", "floats.onnx"])
def test_bench_runs_on_an_onnx_file(name, model_files, tmp_path):
    """Old: it always fed input_ids + attention_mask, whatever inputs the model has."""
    import json
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "bench", str(model_files / name), "--seq", "5",
                           "--repeats", "1", "--no-memory", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["ms"]) >= {"forward", "explainer"} and result["ms"]["explainer"]["median"] > 0


def test_bench_inputs_follow_the_models_specs(model_files):
    from lrpc.bench import spec_inputs
    ids = spec_inputs(model_files / "tokens.onnx", 3, 7)["input_ids"]
    assert ids.shape == (3, 7) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 20  # vocab 20
    x = spec_inputs(model_files / "floats.onnx", 2, 7)
    assert set(x) == {"x"} and x["x"].shape == (2, 6) and x["x"].dtype == np.float32


# ---- class 6: errors that reached users as "(unexpected; rerun with LRPC_DEBUG=1)" ----------------------

@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    np.savez(folder / "wrong-name.npz", foo=np.ones((1, 3), np.int64))
    np.savez(folder / "strings.npz", input_ids=np.array([["a", "b"]]), x=np.array([["a"] * 6]))
    np.savez(folder / "no-arrays.npz")
    (folder / "pickled.npz").write_bytes(b"garbage, not a zip")
    (folder / "tokenizer-without-model.json").write_text("{}")
    (folder / "broken-tokenizer").mkdir()
    (folder / "broken-tokenizer" / "tokenizer.json").write_text("{broken")
    return folder


@pytest.mark.parametrize("command, args, words", [
    ("explain", ["tokens.onnx", "--input", "wrong-name.npz"], ["missing input_ids", "unknown foo"]),
    ("explain", ["tokens.onnx", "--input", "no-arrays.npz"], ["missing input_ids"]),
    ("explain", ["tokens.onnx", "--input", "strings.npz"], ["wrong inputs"]),
    ("explain", ["tokens.onnx", "--tokenizer", "tokenizer-without-model.json", "--text", "hi"],
     ["not a tokenizer.json"]),
    ("explain", ["tokens.onnx", "--tokenizer", "broken-tokenizer", "--text", "hi"], ["not a tokenizer.json"]),
    ("evaluate", ["floats.onnx", "--inputs", "pickled.npz"], ["not a NumPy .npz"]),
    ("evaluate", ["floats.onnx", "--inputs", "wrong-name.npz"], ["missing x", "unknown foo"]),
    ("evaluate", ["tokens.onnx", "--inputs", "strings.npz"], ["unknown x"]),
])
def test_hostile_files_get_a_real_message(command, args, words, model_files, hostile_files, tmp_path):
    """Old: KeyError / ValueError / IndexError / the tokenizers library's bare Exception, shown as
    "unexpected"."""
    where = {name: str(model_files / name) for name in ("tokens.onnx", "floats.onnx")}
    args = [where.get(a, str(hostile_files / a) if (hostile_files / a).exists() else a) for a in args]
    extra = ["--cache", tmp_path / "cache"] if command == "explain" else []
    rc, err = cli(command, *args, *extra)
    one_line_error(rc, err, *words)


def test_a_npy_file_for_input_gets_a_real_message(model_files, tmp_path):
    """Old: TypeError ('numpy.ndarray' object does not support the context manager protocol), "unexpected"."""
    np.save(tmp_path / "x.npy", np.ones((1, 6), np.float32))
    rc, err = cli("explain", model_files / "floats.onnx", "--input", tmp_path / "x.npy", "--cache", tmp_path / "c")
    one_line_error(rc, err, ".npy file", "np.savez")


def test_evaluate_with_a_tokenizer_beyond_the_vocabulary(model_files, tmp_path):
    """Old: IndexError (index 101 is out of bounds for axis 0 with size 20), "unexpected": the default
    tokenizer's ids do not fit the toy model's 20-row embedding table."""
    (tmp_path / "pairs.tsv").write_text("a\tb\n")
    rc, err = cli("evaluate", model_files / "tokens.onnx", "--pairs", tmp_path / "pairs.tsv")
    one_line_error(rc, err, "vocabulary has 20 entries", "--tokenizer")


def test_string_arrays_name_their_dtype(model_files, hostile_files, tmp_path):
    np.savez(tmp_path / "s.npz", input_ids=np.array([["a", "b"]]))
    rc, err = cli("explain", model_files / "tokens.onnx", "--input", tmp_path / "s.npz", "--cache", tmp_path / "c")
    one_line_error(rc, err, "input 'input_ids' has dtype <U1")


def test_missing_sentence_pairs_file():
    from lrpc.evaluate import read_pairs
    with pytest.raises(LrpcError, match="does not exist"):
        read_pairs("no-such-pairs.tsv")



# ---- the third trial: new variations of the classes above --------------------------------------------

@pytest.mark.parametrize("command", ["compile", "explain --html"])
def test_an_output_that_is_a_fifo_is_refused_even_with_force(command, model_files, tmp_path):
    """Old: --force replaced a FIFO by a file (as root, `--html /dev/null --force` would replace the device)."""
    import stat
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    np.savez(tmp_path / "in.npz", input_ids=np.array([[1, 2, 3]]))
    args = (["compile", model_files / "tokens.onnx", "-o", fifo] if command == "compile" else
            ["explain", model_files / "tokens.onnx", "--input", tmp_path / "in.npz", "--html", fifo,
             "--cache", tmp_path / "cache"])
    one_line_error(*cli(*args, "--force"), "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("command, flag", [("explain", "--cache"), ("bench", "--workdir")])
def test_a_folder_option_that_names_a_file(command, flag, model_files, tmp_path):
    """Old: FileExistsError, shown as "unexpected"."""
    np.savez(tmp_path / "in.npz", input_ids=np.array([[1, 2, 3]]))
    args = ["--input", tmp_path / "in.npz"] if command == "explain" else ["--seq", "4", "--repeats", "1",
                                                                          "--no-memory"]
    rc, err = cli(command, model_files / "tokens.onnx", *args, flag, tmp_path / "in.npz")
    one_line_error(rc, err, flag.strip("-"), "is a file, not a folder")


@pytest.mark.parametrize("ids, words", [([[1, -2, 3]], ["input_ids", "negative token id -2"]),
                                        ([[1, 20, 3]], ["input_ids", "token id 20", "vocabulary has 20 entries"])])
def test_token_ids_outside_the_embedding_table(ids, words):
    """Old: a negative id silently read the row counted from the end of the table (ONNX Gather allows it);
    an id past the end came back as onnxruntime's Gather message."""
    explainer = lrpc.Explainer(lrpc.compile(token_model(vocab=20)))
    with pytest.raises(LrpcError) as caught:
        explainer.explain({"input_ids": np.array(ids)})
    for word in words:
        assert word in str(caught.value)


def test_negative_token_ids_on_the_command_line(model_files, tmp_path):
    np.savez(tmp_path / "in.npz", input_ids=np.array([[1, -2, 3]]))
    rc, err = cli("explain", model_files / "tokens.onnx", "--input", tmp_path / "in.npz", "--cache", tmp_path / "c")
    one_line_error(rc, err, "negative token id")


def test_a_position_out_of_range_without_a_target():
    """Old: IndexError, from picking the predicted class at that position before the position was checked."""
    explainer = lrpc.Explainer(lrpc.compile(token_model()))
    with pytest.raises(LrpcError, match=r"position \[4\] out of range \(use -4\.\.3\)"):
        explainer.explain({"input_ids": np.array([[1, 2, 3, 4]])}, position=4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_intervention_factors_must_be_finite(bad, zoo_export):
    """Old: ±Inf passed (input arrays may hold a deliberate −inf mask), giving NaN outputs and relevance."""
    explainer = lrpc.Explainer(lrpc.compile(zoo_export("bert")[1], intervene="mlp"))
    factors = np.ones(explainer.scales["lrp_scale.mlp.0"].shape, np.float32)
    factors[0] = bad
    ids = {k: v.numpy() for k, v in lrpc.models.get("bert").inputs(1, 5).items()}
    with pytest.raises(LrpcError, match=r"lrp_scale\.mlp\.0' contains (NaN|±Inf)"):
        explainer.explain(ids, target=0, scales={"mlp.0": factors})


def test_components_per_position_needs_components():
    """Old: silently ignored."""
    with pytest.raises(LrpcError, match="--components-per-position needs --components"):
        lrpc.compile(token_model(), components_per_position=True)


@pytest.mark.parametrize("flag", ["--window", "--workers", "--threads"])
def test_corpus_counts_are_refused_before_anything_is_written(flag, model_files, tmp_path):
    """Old: --window 0 left OUT.partial/ behind; --workers 0 and --threads 0 ran (every row an error row)."""
    (tmp_path / "in.jsonl").write_text('{"text": "the cat"}\n')
    rc, err = cli("explain", model_files / "tokens.onnx", "--tokenizer", "toy", "--file", tmp_path / "in.jsonl",
                  "--out", tmp_path / "o.jsonl", flag, "0", "--cache", tmp_path / "c")
    one_line_error(rc, err, flag)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"] + (["c"] if (tmp_path / "c").exists() else [])


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_explainer_path_that_is_not_a_file_is_refused_at_once(kind, tmp_path):
    """Old: lrpc.Explainer(fifo) hung reading the metadata before checking the path."""
    path = tmp_path / "fifo" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(path)
    proc = subprocess.run([sys.executable, "-c", f"import lrpc; lrpc.Explainer({str(path)!r})"],
                          capture_output=True, text=True, timeout=120)
    assert "LrpcError" in proc.stderr and "is not a regular file" in proc.stderr, proc.stderr[-500:]


@pytest.mark.parametrize("name", ["no-such-model.onnx", "fifo"])
def test_bench_of_something_that_is_neither_a_file_nor_a_zoo_model(name, tmp_path):
    """Old: KeyError ("unknown zoo model"), shown as "unexpected"."""
    if name == "fifo":
        os.mkfifo(tmp_path / name)
    rc, err = cli("bench", tmp_path / name, "--seq", "4")
    one_line_error(rc, err, "not an ONNX file or a zoo model")
