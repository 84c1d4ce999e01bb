"""Nothing the user has is destroyed: every writer goes through lrpc/safeio.py (docs/design.md, "Safe output").

Each test names what the code before lrpc.safeio did. The signal tests drive a real `lrpc compile` in a
subprocess, stopped at a chosen moment (the driver below prints READY there and waits), and compare the
output folder, name by name and byte by byte, with what it held before."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from lrpc import safeio
from lrpc.cli import main
from lrpc.errors import LrpcError
from onnx_builders import token_model


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_cli(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(rc, err, *words):
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("lrpc: error:") and "Traceback" not in err, err
    for word in words:
        assert word.lower() in err.lower(), err


@pytest.fixture()
def external(tmp_path):
    """A model whose weights are in model.onnx.data beside it."""
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(token_model(), folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    return folder / "model.onnx"


# ------------------------------------------------------------------------------------------------
# outputs that are inputs, or that exist
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("force", [False, True])
def test_explain_html_onto_the_input_model_is_refused(external, force):
    """Before: `--html model.onnx` replaced the model with the HTML report."""
    before = snapshot(external.parent)
    rc, _, err = run_cli("explain", external, "--text", "a b", "--html", external, *(["--force"] if force else []))
    one_line_error(rc, err, "input")
    assert snapshot(external.parent) == before


def test_explain_html_does_not_overwrite_without_force(external, tmp_path):
    """Before: `--html report.html` silently replaced an existing report.html."""
    report = tmp_path / "report.html"
    report.write_text("mine")
    rc, _, err = run_cli("explain", external, "--text", "a b", "--html", report)
    one_line_error(rc, err, "already exists", "--force")
    assert report.read_text() == "mine"


def test_evaluate_json_onto_the_model_is_refused(external, tmp_path):
    """Before: `lrpc evaluate model.onnx --json model.onnx` replaced the model with the metrics."""
    np.savez(tmp_path / "x.npz", input_ids=np.ones((1, 3), np.int64))
    before = snapshot(external.parent)
    for output in (external, external.with_name("model.onnx.data")):
        rc, _, err = run_cli("evaluate", external, "--inputs", tmp_path / "x.npz", "--json", output, "--force")
        one_line_error(rc, err, "input")
    assert snapshot(external.parent) == before


def test_reuse_weights_onto_the_weights_file_is_refused(external, tmp_path):
    """Before: `-o model.onnx.data --force --reuse-weights` replaced the weights by an explainer that
    references itself: the model and the explainer were both lost."""
    before = snapshot(external.parent)
    rc, _, err = run_cli("compile", external, "-o", external.with_name("model.onnx.data"), "--force",
                         "--reuse-weights")
    one_line_error(rc, err, "input")
    assert snapshot(external.parent) == before
    with pytest.raises(LrpcError, match="input"):  # the API refuses it as well
        import lrpc
        lrpc.compile(str(external), output=external.with_name("model.onnx.data"), force=True, reuse_weights=True)
    assert snapshot(external.parent) == before


@pytest.mark.parametrize("command", [["plan"], ["compile"]])
def test_output_onto_the_input_model_is_refused_even_with_force(external, command):
    """Before: `lrpc plan m.onnx -o m.onnx --force` replaced the model with its plan."""
    before = snapshot(external.parent)
    rc, _, err = run_cli(*command, external, "-o", external, "--force")
    one_line_error(rc, err, "input")
    assert snapshot(external.parent) == before


def test_bench_workdir_keeps_an_existing_explainer(external, tmp_path):
    """Before: `lrpc bench m.onnx --workdir W` compiled over W/model.explainer.onnx with force."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.explainer.onnx").write_text("an explainer I keep")
    rc, _, err = run_cli("bench", external, "--workdir", work, "--no-memory", "--occlusion", "off",
                         "--repeats", "1", "--seq", "4")
    one_line_error(rc, err, "already exists")
    assert (work / "model.explainer.onnx").read_text() == "an explainer I keep"


def test_bench_leaves_no_temporary_folder(external, tmp_path):
    """Before: every `lrpc bench` without --workdir left a /tmp/lrpc-bench-* folder (model and explainer)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    run_cli("bench", external, "--no-memory", "--occlusion", "off", "--repeats", "1", "--seq", "4", env=env)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("lrpc-bench-")] == []


# ------------------------------------------------------------------------------------------------
# the exclusive create, a full disk
# ------------------------------------------------------------------------------------------------

def test_concurrent_compiles_exactly_one_wins(external, tmp_path):
    """Before: two compiles to one -o without --force both passed the exists-check and both "succeeded",
    the second silently replacing the first. Now the publish is an exclusive create (os.link)."""
    out = tmp_path / "e.onnx"
    procs = [subprocess.Popen([sys.executable, "-m", "lrpc.cli", "compile", str(external), "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errors = [p.stderr.read() for p in procs]
    assert codes == [0, 2], errors  # both may see the name free; only one can create it
    assert any("already exists" in e for e in errors), errors
    onnx.checker.check_model(str(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(safeio.TEMP_PREFIX)]


def test_exclusive_create_between_two_writers(tmp_path):
    """The race itself, without timing luck: the second writer finds the name taken at publish time."""
    target = tmp_path / "out.txt"

    def write(tmp: Path) -> None:
        tmp.write_text("second")
        target.write_text("first")  # another process publishes while this one writes

    with pytest.raises(LrpcError, match="already exists"):
        safeio.publish(target, write)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    """Before: `lrpc plan -o plan.txt` on a full disk left a `.plan.txt.tmp` behind."""
    model = tmp_path / "model.onnx"
    onnx.save(token_model(), model)
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)  # part of it made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["plan", str(model), "-o", str(tmp_path / "plan.txt")]) == 2
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# ------------------------------------------------------------------------------------------------
# SIGTERM and SIGKILL at chosen moments of a real compile
# ------------------------------------------------------------------------------------------------

DRIVER = textwrap.dedent('''
    import os, sys, time
    import onnx_ir as ir
    from lrpc import compiler, loading
    moment = sys.argv[1]
    loading.INLINE_LIMIT_BYTES = 0  # weights go to <out>.data: two files to publish

    def ready():
        if not ready.done:  # once: the rollback's own moves must run free
            ready.done = True
            print("READY", flush=True)
            time.sleep(60)
    ready.done = False

    if moment == "compiling":
        build = compiler.build_explainer
        compiler.build_explainer = lambda *a, **k: (ready(), build(*a, **k))[1]
    elif moment == "writing":
        save = ir.save
        ir.save = lambda *a, **k: (save(*a, **k), ready())
    elif moment == "publishing":  # after the .data file is in place, before the model is
        link, replace = os.link, os.replace
        def pause_after(real):
            def op(src, dst, *a, **k):
                real(src, dst, *a, **k)
                if str(dst).endswith(".data") and "lrpc-tmp" not in str(dst):  # in place, not a backup
                    ready()
            return op
        os.link, os.replace = pause_after(link), pause_after(replace)
    from lrpc.cli import main
    sys.exit(main(sys.argv[2:]))
''')


def start(moment: str, *args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, moment, "compile", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "READY", proc.stderr.read()
    return proc


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("moment", ["compiling", "writing", "publishing"])
def test_sigterm_leaves_the_output_folder_as_it_was(external, tmp_path, moment, force):
    """Before: a SIGTERM while writing left a hidden `.lrpc-*` folder (and, between the two moves, a new
    .data file beside the old model) forever."""
    out = tmp_path / "out"
    out.mkdir()
    if force:  # an explainer already there, replaced under --force: it must survive the kill intact
        (out / "e.onnx").write_bytes(b"old model")
        (out / "e.onnx.data").write_bytes(b"old weights")
    before = snapshot(out)
    proc = start(moment, external, "-o", out / "e.onnx", *(["--force"] if force else []))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert snapshot(out) == before


def test_sigkill_leftovers_are_removed_by_the_next_compile(external, tmp_path):
    """Before: a SIGKILLed compile's `.lrpc-*` temporary folder stayed in the output folder forever."""
    out = tmp_path / "out"
    out.mkdir()
    proc = start("writing", external, "-o", out / "e.onnx")
    proc.kill()
    proc.wait(timeout=60)
    assert [p for p in out.iterdir() if p.name.startswith(safeio.TEMP_PREFIX)], "nothing left to clean"
    rc, _, err = run_cli("compile", external, "-o", out / "other.onnx")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["other.onnx"]


def test_stale_cleanup_spares_live_writers(tmp_path):
    """Only temporary entries whose writer is dead are removed; a live writer's folder is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f"{safeio.TEMP_PREFIX}{os.getppid()}-abc"
    stale = tmp_path / f"{safeio.TEMP_PREFIX}{dead.pid}-def"
    for folder in (live, stale):
        folder.mkdir()
        (folder / "part").write_text("half")
    safeio.write_text(tmp_path / "out.txt", "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out.txt"])
