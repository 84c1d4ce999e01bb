"""Every ```bash and ```python block of the README runs, and the `$ ` commands of every ```console block
(their output is an example: random-weight zoo models; not compared). The convention is in the README's
Layout part.

Each block runs in a fresh folder holding the names the blocks use. `lrpc` lines run in process through
`lrpc.cli.main` and must exit 0; zoo models come from the test session's exports (tests/conftest.py), and
the MiniLM is replaced by the tiny zoo BERT (same kind of inputs, seconds instead of a real export). A
block marked `<!-- skip-test: reason -->` is skipped with that reason; plain ``` blocks (output) are not run.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUNNABLE = ("bash", "console", "python")
SKIP = re.compile(r"^<!--\s*skip-test:\s*(.+?)\s*-->\s*$")
SUBSTITUTE = {"minilm-sentence": "bert"}   # the real MiniLM's export takes minutes on 2 cores


def blocks() -> list[tuple[int, str, str, str | None]]:
    """(line of the opening fence, language, code, skip reason or None) of each runnable block."""
    found, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(previous)
        if fence.group(1) in RUNNABLE:
            code = lines[i + 1:end]
            if fence.group(1) == "console":   # the commands; the other lines are their output
                code = [line[2:] if line.startswith("$ ") else "" for line in code]
            found.append((i + 1, fence.group(1), "\n".join(code), skip.group(1) if skip else None))
        i = end + 1
    return found


BLOCKS = blocks()


def test_the_readme_has_runnable_blocks_and_skips_say_why():
    assert sum(1 for *_, skip in BLOCKS if skip is None) >= 5
    assert all(len(skip) > 10 for *_, skip in BLOCKS if skip)


@pytest.fixture(scope="module")
def fixtures(zoo_export, tmp_path_factory):
    """The files README blocks name, made once; each block gets a copy."""
    folder = tmp_path_factory.mktemp("readme-fixtures")
    onnx.save(zoo_export("llama")[1], folder / "model.onnx")
    ids = np.array([[1, 5, 9, 17, 20], [1, 7, 3, 4, 0]], np.int64)
    np.savez(folder / "inputs.npz", input_ids=ids, attention_mask=(ids > 0).astype(np.int64))
    (folder / "corpus.jsonl").write_text('{"text": "the cat sat on the mat"}\n{"text": "a good movie", "id": "m"}\n'
                                         '{"text": "the dog", "top_k": 2}\n')
    shutil.copy(ROOT / "docs" / "examples" / "shapes.png", folder / "shapes.png")
    return folder


@pytest.fixture(scope="module")
def zoo_from_the_session(zoo_export):
    """Zoo names compiled on the way use this session's exports instead of exporting again."""
    from lrpc import cache, models
    original = cache.onnx_source

    def onnx_source(model, task, pooling=None):
        if isinstance(model, str) and model in models.names() and pooling is None:
            return zoo_export(model)[1]
        return original(model, task, pooling)
    cache.onnx_source = onnx_source
    yield
    cache.onnx_source = original


def run_bash(code: str, where: int) -> None:
    from lrpc.cli import main
    for n, line in enumerate(code.splitlines()):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "lrpc", (f"README.md:{where + 1 + n}: `{words[0]}` is not run in process: mark the block "
                                    "<!-- skip-test: reason -->")
        args = [SUBSTITUTE.get(w, w) for w in words[1:]]
        assert main(args) == 0, f"README.md:{where + 1 + n}: `{line.strip()}` failed"


@pytest.mark.parametrize("where, language, code, skip", BLOCKS, ids=[f"line{b[0]}-{b[1]}" for b in BLOCKS])
def test_readme_block_runs(where, language, code, skip, fixtures, zoo_from_the_session, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"README.md:{where}: {skip}")
    work = tmp_path / "work"
    shutil.copytree(fixtures, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("LRPC_CACHE", str(fixtures.parent / "readme-cache"))   # shared by the blocks
    if language in ("bash", "console"):
        run_bash(code, where)
    else:
        exec(compile(code, f"README.md:{where}", "exec"), {"__name__": "__readme__"})  # noqa: S102
