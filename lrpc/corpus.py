"""Corpus-scale explanation: `lrpc explain MODEL --file corpus.jsonl --out results.parquet` (or `.jsonl`).

The corpus is streamed in windows of `window` lines; inside a window the inputs are sorted by length
(length bucketing: batches pad little), explained in batches, and the rows are put back in input order, so
the output is in the corpus's order whatever the bucketing or the engine. Each finished window is written
as one part file of `OUT.partial/` (atomically), which is what makes a run resumable: `--resume` continues
after the last line of the last part. At the end the parts are merged into a temporary file next to OUT and
published with one rename. Memory is bounded by a window, never by the corpus.

One row per explained input and target (several with top_k); an input that fails becomes one error row.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lrpc import inputs, safeio
from lrpc.attributor import Attributor
from lrpc.errors import LrpcError
from lrpc.inputs import SPEC_KEYS
from lrpc.results import Attributions

SCHEMA = pa.schema([
    ("id", pa.string()),                   # the line's "id", else its line number
    ("line", pa.int64()),                  # 1-based line number in the corpus file
    ("tokens", pa.list_(pa.string())),     # null for images
    ("token_ids", pa.list_(pa.int64())),   # null for images
    ("offsets", pa.list_(pa.list_(pa.int32()))),   # each token's [start, end) characters in the text
    ("relevance", pa.list_(pa.float32())),  # flattened; `shape` gives its shape ([tokens] or [C, H, W])
    ("shape", pa.list_(pa.int32())),
    ("target", pa.int64()),
    ("label", pa.string()),
    ("logit", pa.float64()),               # the explained value
    ("conservation", pa.float64()),        # Σ relevance over every attributed input (≈ logit)
    ("error", pa.string()),                # null, or why this input could not be explained
])
FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
ROW_GROUP = 1024          # rows per Parquet row group of the published file (fixed: same bytes after a resume)


# ------------------------------------------------------------------------------------------------
# reading the corpus
# ------------------------------------------------------------------------------------------------

@dataclass
class Line:
    """One input of the corpus: text or an image path, with its own target options (or an error)."""
    number: int
    id: str
    text: str | None = None
    image: Path | None = None
    spec: dict = field(default_factory=dict)
    error: str | None = None


def parse_line(raw: str, number: int, folder: Path, defaults: dict, plain_text: bool) -> Line | None:
    """A corpus line as a `Line` (None for a blank line). JSON lines are read by `lrpc.inputs.parse_line`
    ({"text": …} or {"image": PATH relative to the corpus}, optionally with "id", "target", "contrast",
    "position", "top_k"); plain text files: the line."""
    raw = raw.rstrip("\r\n")
    if not raw.strip():
        return None
    if plain_text:
        return Line(number, str(number), text=raw, spec={k: defaults.get(k) for k in SPEC_KEYS})
    parsed = inputs.parse_line(raw, number, folder, defaults)
    line = Line(number, parsed.id, spec=parsed.spec, error=parsed.error)
    if isinstance(parsed.item, str):
        line.text = parsed.item
    elif isinstance(parsed.item, Path):
        line.image = parsed.item
    elif line.error is None:   # arrays ("npz", "inputs"): explained by `lrpc explain --file` without --out
        line.error = f'line {number}: --out takes "text" (a string) or "image" (a path) lines'
    return line


class Corpus:
    """A corpus file read as a stream of `Line`s; `windows()` gives (byte offset, first line, count) for
    workers that read their own part of the file (the Ray engine)."""

    def __init__(self, path: str | os.PathLike, defaults: dict | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise LrpcError(f"{self.path} does not exist: give a corpus file (JSON lines, or plain text lines)")
        self.defaults = {k: (defaults or {}).get(k) for k in SPEC_KEYS}
        self.plain_text = self.path.suffix.lower() == ".txt"

    def count(self) -> int:
        with open(self.path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def lines(self, after: int = 0, offset: int = 0, limit: int | None = None) -> Iterator[Line]:
        """The lines numbered after `after`, at most `limit` of them. offset: the byte where line after+1
        starts (a window's, from `windows`), else the file is read from its start."""
        with open(self.path, "rb") as f:   # binary: lines end at b"\n" only, as in `count` and `windows`
            f.seek(offset)
            number = after if offset else 0
            for raw in f:
                number += 1
                if number <= after:
                    continue
                if limit is not None and number > after + limit:
                    return
                line = parse_line(raw.decode("utf-8", errors="replace"), number, self.path.parent, self.defaults,
                                  self.plain_text)
                if line is not None:
                    yield line

    def windows(self, size: int, after: int = 0) -> Iterator[tuple[int, int, int]]:
        """(byte offset, lines before it, line count) of each window of `size` lines after line `after`."""
        with open(self.path, "rb") as f:
            offset, number = 0, 0
            start, first = None, 0
            for raw in iter(f.readline, b""):
                number += 1
                if number > after and start is None:
                    start, first = offset, number - 1
                offset += len(raw)
                if start is not None and number - first == size:
                    yield start, first, size
                    start = None
            if start is not None:
                yield start, first, number - first


def batched(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------------------
# explaining a window
# ------------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """How to build the Attributor: what the CLI was given. Ray actors build their own from it."""
    model: str
    tokenizer: str | None = None
    preset: str = "attnlrp"
    task: str | None = None
    cache: str | None = None
    threads: int | None = None
    session_config: dict = field(default_factory=dict)

    def build(self) -> Attributor:
        return Attributor(self.model, tokenizer=self.tokenizer, preset=self.preset, task=self.task,
                          cache=self.cache, threads=self.threads, session_config=self.session_config)


class WindowExplainer:
    """Explains windows of lines into Arrow tables of rows, in input order."""

    def __init__(self, attributor, batch_size: int = 16, bucket: bool = True):
        self.attributor = attributor
        self.batch_size = batch_size
        self.bucket = bucket

    def length(self, line: Line) -> int:
        """Sort key for bucketing: tokens of a text (characters without a tokenizer), 0 for images."""
        tokenizer = self.attributor.tokenizer
        if line.text is None:
            return 0
        return len(tokenizer.encode(line.text)[0]) if tokenizer is not None else len(line.text)

    def explain(self, lines: list[Line]) -> pa.Table:
        rows: dict[int, list[dict]] = {}
        todo = []
        for line in lines:
            if line.error:
                rows[line.number] = [error_row(line, line.error)]
            else:
                todo.append(line)
        spec_key = lambda line: json.dumps(line.spec, sort_keys=True, default=str)  # noqa: E731
        if self.bucket:
            todo.sort(key=lambda line: (spec_key(line), self.length(line)))   # stable: ties keep input order
        group: list[Line] = []
        for line in todo:
            if group and (spec_key(group[0]) != spec_key(line) or len(group) == self.batch_size):
                self._batch(group, rows)
                group = []
            group.append(line)
        if group:
            self._batch(group, rows)
        ordered = [row for line in lines for row in rows[line.number]]
        return pa.Table.from_pylist(ordered, schema=SCHEMA)

    def _batch(self, group: list[Line], rows: dict) -> None:
        try:
            results = self._attribute(group)
        except LrpcError as exc:
            if len(group) == 1:
                rows[group[0].number] = [error_row(group[0], f"line {group[0].number}: {exc}")]
                return
            for line in group:   # one input failed the batch: run each alone to find it
                self._batch([line], rows)
            return
        per_input = len(results) // len(group)   # top_k rows per input, else one
        for i, line in enumerate(group):
            rows[line.number] = [result_row(line, a) for a in results[i * per_input:(i + 1) * per_input]]

    def _attribute(self, group: list[Line]) -> list:
        spec = group[0].spec
        texts = [line.text for line in group if line.text is not None]
        images = [str(line.image) for line in group if line.image is not None]
        if texts and images:
            raise LrpcError("texts and images in one batch")   # a mixed corpus: each then runs alone
        result = self.attributor.attribute(texts or None, image=images or None, batch_size=len(group), **spec)
        return list(result) if isinstance(result, Attributions) else [result]


def result_row(line: Line, a) -> dict:
    relevance = np.asarray(a.relevance, np.float32)
    return {"id": line.id, "line": line.number, "tokens": a.tokens, "token_ids": a.token_ids,
            "offsets": None if a.offsets is None else [list(o) for o in a.offsets], "relevance": relevance.reshape(-1),
            "shape": list(relevance.shape), "target": a.target, "label": a.target_label, "logit": a.logit,
            "conservation": a.conservation, "error": None}


def error_row(line: Line, message: str) -> dict:
    return {"id": line.id, "line": line.number, "tokens": None, "token_ids": None, "offsets": None, "relevance": None,
            "shape": None, "target": None, "label": None, "logit": None, "conservation": None, "error": message}


# ------------------------------------------------------------------------------------------------
# the output: parts while running, one file at the end
# ------------------------------------------------------------------------------------------------

class Output:
    """OUT (.parquet or .jsonl). Each finished window is one part file of OUT.partial/ (written to a
    temporary name, then renamed: a killed run leaves only whole parts); `publish` merges them into a
    temporary file next to OUT and renames it. The run's settings are kept in OUT.partial/run.json so a
    resume with other settings is refused instead of mixing two runs in one file."""

    def __init__(self, path: str | os.PathLike, settings: dict, *, resume: bool = False, force: bool = False,
                 inputs: Iterable[str | os.PathLike] = ()):
        self.path = Path(path)
        self.format = FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise LrpcError(f"--out {self.path}: give a .parquet or .jsonl file")
        self.force, self.inputs = force, list(inputs)
        safeio.check_output(self.path, force=force, inputs=self.inputs)   # fail before any work
        self.partial = self.path.with_name(self.path.name + ".partial")
        manifest = self.partial / "run.json"
        if self.partial.exists():
            if resume and manifest.is_file() and json.loads(manifest.read_text()) != settings:
                raise LrpcError(f"{self.partial} was written with other settings (model, corpus or targets): "
                                "resume with the same ones, or start over with --force")
            if not resume and not force:
                raise LrpcError(f"an interrupted run left {self.partial}: continue it with --resume, or start "
                                "over with --force")
            if not resume:
                shutil.rmtree(self.partial)
        self.partial.mkdir(exist_ok=True)
        for stale in self.partial.glob(".*.tmp"):   # a part being written when the run was killed
            stale.unlink()
        manifest.write_text(json.dumps(settings))

    def parts(self) -> list[Path]:
        return sorted(self.partial.glob(f"part-*.{self.format}"))

    def done_through(self) -> int:
        """The last line number written (parts are in corpus order), 0 for none."""
        parts = self.parts()
        if not parts:
            return 0
        return int(pc.max(read_part(parts[-1], self.format, ["line"])["line"]).as_py())

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        first = table["line"][0].as_py()
        final = self.partial / f"part-{first:012d}.{self.format}"
        tmp = self.partial / f".{final.name}.tmp"
        if self.format == "parquet":
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, final)

    def publish(self) -> int:
        """Merge the parts into OUT (through safeio: atomic, never over an existing file without --force)
        and remove OUT.partial/. Returns the number of rows."""
        rows = 0

        def write(tmp: Path) -> None:
            nonlocal rows
            if self.format == "parquet":
                with pq.ParquetWriter(tmp, SCHEMA) as writer:
                    pending = SCHEMA.empty_table()
                    for part in self.parts():   # fixed row groups: the same bytes however the run was split
                        pending = pa.concat_tables([pending, read_part(part, "parquet")])
                        while pending.num_rows >= ROW_GROUP:
                            writer.write_table(pending.slice(0, ROW_GROUP), row_group_size=ROW_GROUP)
                            pending, rows = pending.slice(ROW_GROUP), rows + ROW_GROUP
                    if pending.num_rows or not rows:
                        writer.write_table(pending, row_group_size=ROW_GROUP)
                        rows += pending.num_rows
            else:
                with open(tmp, "wb") as f:
                    for part in self.parts():
                        with open(part, "rb") as src:
                            rows += sum(1 for _ in src)
                            src.seek(0)
                            shutil.copyfileobj(src, f)

        safeio.publish(self.path, write, force=self.force, inputs=self.inputs)
        shutil.rmtree(self.partial)
        return rows


def read_part(path: Path, fmt: str, columns: list[str] | None = None) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path, columns=columns, schema=SCHEMA)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.select(columns) if columns else table


def read_output(path: str | os.PathLike) -> pa.Table:
    """A published output as one Arrow table (tests and small corpora: this does hold it all)."""
    path = Path(path)
    return read_part(path, FORMATS[path.suffix.lower()])
