"""The CLI: compile / plan / diff end to end, and the bad-input catalogue (one line, exit 2, no file left)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lrpc
from lrpc.cli import main
from onnx_builders import float_model, token_model


def run_cli(*args):
    """The installed console script in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(token_model(), path)
    return path


def assert_one_line_error(rc, err, *words):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("lrpc: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in err.lower(), err


def test_compile_writes_a_working_explainer(model_path, tmp_path):
    out = tmp_path / "explainer.onnx"
    rc, stdout, err = run_cli("compile", model_path, "-o", out, "--preset", "gxi")
    assert rc == 0, err
    ex = lrpc.Explainer(out)
    res = ex.explain({"input_ids": np.array([[1, 2, 3]])}, target=[1], position=[1])
    assert res.relevance["input_ids"].shape == (1, 3)
    assert np.all(res.relevance["input_ids"][0, 2] == 0)  # position 1 does not see token 2


def test_version_and_help():
    rc, out, _ = run_cli("--version")
    assert rc == 0 and out.startswith("lrpc ")
    rc, out, _ = run_cli("compile", "--help")
    assert rc == 0 and "examples:" in out


def test_existing_output_needs_force(model_path, tmp_path):
    out = tmp_path / "explainer.onnx"
    out.write_bytes(b"precious")
    rc, _, err = run_cli("compile", model_path, "-o", out)
    assert_one_line_error(rc, err, "--force")
    assert out.read_bytes() == b"precious"
    rc, _, err = run_cli("compile", model_path, "-o", out, "--force")
    assert rc == 0, err
    onnx.load(out)


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 20)
    out = tmp_path / "out.onnx"
    rc, _, err = run_cli("compile", bad, "-o", out)
    assert_one_line_error(rc, err, "not a valid ONNX")
    assert not out.exists()


def test_truncated_file(model_path, tmp_path):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli("compile", cut, "-o", tmp_path / "out.onnx")
    assert_one_line_error(rc, err)
    assert not (tmp_path / "out.onnx").exists()


def test_missing_and_truncated_external_data(tmp_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(token_model(), folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    data = folder / "m.onnx.data"
    payload = data.read_bytes()
    data.write_bytes(payload[: len(payload) // 2])
    rc, _, err = run_cli("compile", folder / "m.onnx", "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, "truncated")
    data.unlink()
    rc, _, err = run_cli("compile", folder / "m.onnx", "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, "missing", "m.onnx.data")
    assert not (tmp_path / "o.onnx").exists()


def test_op_without_rule(tmp_path):
    model = token_model()
    node = model.graph.node[2]   # Tanh → a real ONNX op with no rule and no function body
    node.op_type = "MaxRoiPool"
    node.input.append("rois")
    node.attribute.append(helper.make_attribute("pooled_shape", [1, 1]))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 5), np.float32), "rois"))
    path = tmp_path / "maxroipool.onnx"
    onnx.save(model, path)
    rc, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx", "--preset", "gxi")
    assert_one_line_error(rc, err, "MaxRoiPool", "lrpc ops")
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_custom_domain(tmp_path):
    model = token_model()
    node = model.graph.node[2]
    node.domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    rc, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, "com.example")


def test_model_without_outputs(tmp_path):
    model = token_model()
    del model.graph.output[:]
    path = tmp_path / "noout.onnx"
    onnx.save(model, path)
    rc, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, "no outputs")


def test_compiling_an_explainer_twice(model_path, tmp_path):
    first = tmp_path / "e.onnx"
    assert run_cli("compile", model_path, "-o", first)[0] == 0
    rc, _, err = run_cli("compile", first, "-o", tmp_path / "e2.onnx")
    assert_one_line_error(rc, err, "already an lrpc explainer")


def test_old_opset_is_upgraded_and_ancient_refused(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(float_model(opset=13), path)
    assert run_cli("compile", path, "-o", tmp_path / "o.onnx")[0] == 0
    ancient = float_model(opset=13)
    ancient.opset_import[0].version = 5
    onnx.save(ancient, tmp_path / "ancient.onnx")
    rc, _, err = run_cli("compile", tmp_path / "ancient.onnx", "-o", tmp_path / "o2.onnx")
    assert_one_line_error(rc, err, "opset 5")


def test_unwritable_or_missing_output_folder(model_path, tmp_path):
    rc, _, err = run_cli("compile", model_path, "-o", tmp_path / "no" / "such" / "dir" / "e.onnx")
    assert_one_line_error(rc, err, "does not exist")


def test_output_name_clash_is_refused(tmp_path):
    path = tmp_path / "clash.onnx"
    onnx.save(token_model(output_name="relevance.input_ids"), path)
    rc, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err, "relevance.input_ids")


def test_plan_and_diff(model_path, tmp_path):
    rc, out, err = run_cli("plan", model_path, "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["summary"] == {"activation": 1, "bilinear": 1}
    saved = tmp_path / "plan.json"
    saved.write_text(out)
    assert run_cli("diff", saved, model_path)[0] == 0
    other = tmp_path / "other.onnx"
    onnx.save(float_model(), other)
    rc, out, _ = run_cli("diff", model_path, other)
    assert rc == 1 and "identity" in out


def test_in_process_main_returns_2_on_error(tmp_path, capsys):
    assert main(["compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
