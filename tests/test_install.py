"""What each install can do: the core install (one onnxruntime, no PyTorch, transformers, tokenizers or
matplotlib) runs every command that does not need them, and the others name the extra to install in one
line, before any output; `lrpc[gpu]` resolves to exactly one onnxruntime distribution, the CUDA one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import lrpc
from lrpc import runtime

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL = ("torch", "transformers", "tokenizers", "matplotlib")


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A clean virtualenv with lrpc and its core dependencies plus the cpu extra only."""
    venv = tmp_path_factory.mktemp("core-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    deps = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["cpu"]
    done = pip(python, "install", "-q", "-c", str(ROOT / "constraints.txt"), *deps)
    assert done.returncode == 0, done.stderr[-2000:]
    done = pip(python, "install", "-q", "--no-deps", "-e", str(ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


@pytest.fixture(scope="module")
def files(tmp_path_factory, zoo_export) -> Path:
    """The zoo's tiny BERT as ONNX, its explainer and one input batch, made with the full install."""
    folder = tmp_path_factory.mktemp("core-files")
    onnx.save(zoo_export("bert")[1], folder / "bert.onnx")
    lrpc.compile(str(folder / "bert.onnx"), output=folder / "explainer.onnx")
    np.savez(folder / "x.npz", input_ids=np.array([[1, 5, 6, 7, 2]], dtype=np.int64),
             attention_mask=np.ones((1, 5), dtype=np.int64))
    return folder


@pytest.mark.slow
def test_core_install_runs_the_onnx_commands_and_names_missing_extras(core_venv, files):
    python = core_venv / "bin" / "python"
    absent = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in "
                             f"{list(OPTIONAL)} if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert absent.stdout.strip() == "[]", f"the core venv has {absent.stdout}"

    def lrpc_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(core_venv / "bin" / "lrpc"), *args], capture_output=True, text=True,
                              cwd=files, timeout=600, env={**os.environ, "LRPC_CACHE": str(files / "cache")})

    # what the core install runs
    shown = lrpc_cli("explain", "explainer.onnx", "--input", "x.npz", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    # the same relevance as the full install computes in this process
    expected = lrpc.Attributor(str(files / "explainer.onnx")).attribute(dict(np.load(files / "x.npz")))
    np.testing.assert_allclose(doc["relevance"], expected.relevance, rtol=1e-5, atol=1e-7)
    for args in (["explain", "bert.onnx", "--input", "x.npz"], ["plan", "bert.onnx"],
                 ["plan", "bert.onnx", "--format", "json", "-o", "plan.json"], ["diff", "plan.json", "bert.onnx"],
                 ["ops"], ["zoo"], ["evaluate", "bert.onnx", "--input", "x.npz"],
                 ["compile", "bert.onnx", "-o", "again.onnx"]):
        done = lrpc_cli(*args)
        assert done.returncode == 0, f"lrpc {' '.join(args)}: {done.stderr}"

    # what needs an extra: one line on stderr naming it, exit code 2, nothing on stdout
    (files / "hf").mkdir()
    (files / "hf" / "config.json").write_text('{"model_type": "bert"}')
    for args, extra in ((["demo"], "lrpc[minilm]"), (["explain", "explainer.onnx", "--input", "x.npz", "--png",
                                                       "x.png"], "lrpc[viz]"),
                        (["evaluate", "bert.onnx", "--input", "x.npz", "--plot", "c.png"], "lrpc[viz]"),
                        (["compile", "hf", "-o", "hf.onnx"], "lrpc[torch]"),
                        (["explain", "bert", "--text", "the cat"], "lrpc[torch]")):
        done = lrpc_cli(*args)
        assert (done.returncode, done.stdout) == (2, ""), f"lrpc {' '.join(args)}: {done.stdout}{done.stderr}"
        assert len(done.stderr.splitlines()) == 1 and extra in done.stderr, done.stderr
    assert not (files / "x.png").exists() and not (files / "c.png").exists()


def test_gpu_extra_resolves_to_the_cuda_onnxruntime_only(tmp_path):
    """pip's own resolver: `lrpc[gpu]` selects onnxruntime-gpu and not the CPU wheel (`lrpc[cpu]` the
    reverse)."""
    for extra, wanted, unwanted in (("gpu", "onnxruntime-gpu", "onnxruntime"),
                                    ("cpu", "onnxruntime", "onnxruntime-gpu")):
        report = tmp_path / f"{extra}.json"
        done = pip(Path(sys.executable), "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                   str(report), f"{ROOT}[{extra}]")
        if done.returncode != 0:
            if "Could not find a version" in done.stderr or "NewConnectionError" in done.stderr or \
                    "Network is unreachable" in done.stderr or "Failed to establish" in done.stderr:
                pytest.skip(f"the package registry is unreachable: {done.stderr.splitlines()[-1]}")
            raise AssertionError(done.stderr[-2000:])
        names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
        assert wanted in names and unwanted not in names, sorted(names)


def test_a_visible_gpu_with_the_cpu_provider_warns_with_the_fix(monkeypatch, files):
    monkeypatch.setattr(runtime, "cuda_visible", lambda: True)
    with pytest.warns(UserWarning, match="CUDA GPU is visible but onnxruntime runs on the CPU.*fix: "):
        lrpc.Explainer(files / "explainer.onnx")
    with warnings.catch_warnings():   # the CPU asked for explicitly: no advice
        warnings.simplefilter("error")
        lrpc.Explainer(files / "explainer.onnx", providers=["CPUExecutionProvider"])
