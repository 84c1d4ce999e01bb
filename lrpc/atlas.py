"""Concept atlases: for every unit of the selected components, the corpus samples that activate it most
(ActMax) and those for whose own prediction it is most relevant (RelMax, as in Concept Relevance
Propagation), kept in one SQLite file (docs/design.md, "Concept atlases").

The build streams the corpus in batches; per component it holds only [units, k] scores, sample ids and
positions (plus the texts those ids name), so memory is bounded by units × k, not by the corpus. After
every batch the state is saved beside the atlas (`<atlas>.partial.npz`): an interrupted build started again
with the same arguments resumes after the last saved batch. Batches are the same on resume and the top-k
order is total (score descending, then sample index), so a resumed atlas is byte for byte the one an
uninterrupted build writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lrpc import safeio
from lrpc.errors import LrpcError

FORMAT = "lrpc-atlas/1"
KINDS = ("act", "rel")      # ActMax, RelMax
NO_SAMPLE = np.iinfo(np.int64).max


# ---- the corpus ---------------------------------------------------------------------------------------

class Corpus:
    """A corpus for `build`: text (one sample per non-empty line), `.jsonl` ({"text": …} objects or JSON
    strings), or `.npz` images (`NpzImages`). Every text line is parsed when the corpus is opened, so a bad
    line fails the build before any work; an .npz is checked against the model's image input by `size`."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LrpcError(f"corpus {self.path} does not exist")
        self.images = NpzImages(self.path) if self.path.suffix.lower() == ".npz" else None
        self._texts = None if self.images else sum(1 for _ in _lines(self.path))

    def size(self, attributor) -> int:
        n = self.images.check(attributor) if self.images else self._texts
        if not n:
            raise LrpcError(f"corpus {self.path} has no samples")
        return n

    def samples(self):
        """(what the model takes, what the atlas stores) per sample, streamed: a text twice, or one image's
        {input: [1, C, H, W]} with "image <index>" (and its label)."""
        if self.images:
            yield from self.images.samples()
        else:
            for _, text in _lines(self.path):
                yield text, text


def _lines(path: Path):
    jsonl = path.suffix.lower() == ".jsonl"
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                yield number, (_json_text(path, number, line) if jsonl else line.rstrip("\n"))
        except UnicodeDecodeError as exc:
            raise LrpcError(f"corpus {path} is not UTF-8 text ({exc.reason} near byte {exc.start})") from None


def _json_text(path, number, line) -> str:
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise LrpcError(f"{path}:{number}: not JSON ({exc}); give one {{\"text\": \"…\"}} per line") from None
    text = doc if isinstance(doc, str) else doc.get("text") if isinstance(doc, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise LrpcError(f"{path}:{number}: expected {{\"text\": \"…\"}} with a non-empty text")
    return text


class NpzImages:
    """An image corpus: `images` (or an array named like the model's image input) [N, C, H, W] floats,
    already scaled and normalised as the model takes them, and optional integer `labels` [N], stored with
    each reference's description. Rows are read from the archive one at a time (np.load would read the
    whole array), so memory does not grow with N. A reference's sample id is the image's index."""

    IMAGES, LABELS = "images", "labels"

    def __init__(self, path: Path):
        self.path = path
        self.headers = {}
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".npy"):
                        with archive.open(member) as fh:
                            self.headers[member[:-4]] = _npy_header(fh)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise LrpcError(f"corpus {path} is not a readable .npz archive ({exc}); write it with numpy.savez") from None
        self.key = self.input = None

    def check(self, attributor) -> int:
        """The number of images, after checking the array against the model's image input."""
        name = attributor.main_input
        spec = list(attributor.explainer.inputs[name].shape)
        if len(spec) != 4:
            raise LrpcError(f"an .npz image corpus needs a model with an image input [batch, C, H, W]; input "
                            f"'{name}' is shaped {spec}: give a text corpus")
        self.key = next((k for k in (name, self.IMAGES) if k in self.headers), None)
        if self.key is None:
            raise LrpcError(f"corpus {self.path} has no array '{self.IMAGES}' or '{name}' (it has "
                            f"{', '.join(self.headers) or 'none'}): save the images [N, C, H, W] under one of them")
        self.input = name
        shape, fortran, dtype = self.headers[self.key]
        where = f"corpus {self.path}: '{self.key}'"
        if dtype.kind != "f":
            raise LrpcError(f"{where} holds {dtype}, not floats: save the pixel values as float32, scaled and "
                            "normalised as the model takes them")
        if len(shape) != 4 or any(isinstance(d, int) and d != n for d, n in zip(spec[1:], shape[1:])):
            wanted = ", ".join(str(d) if isinstance(d, int) else "?" for d in spec[1:])
            raise LrpcError(f"{where} is shaped {list(shape)}; the model takes images [N, {wanted}]")
        if fortran:
            raise LrpcError(f"{where} is stored in Fortran order: save numpy.ascontiguousarray(images)")
        if self.LABELS in self.headers:
            labels_shape, _, labels_dtype = self.headers[self.LABELS]
            if labels_dtype.kind not in "iu" or labels_shape != shape[:1]:
                raise LrpcError(f"corpus {self.path}: '{self.LABELS}' is {labels_dtype} {list(labels_shape)}; "
                                f"give one integer per image ([{shape[0]}])")
        return shape[0]

    def samples(self):
        labels = None
        if self.LABELS in self.headers:
            with np.load(self.path) as archive:
                labels = archive[self.LABELS]
        for index, pixels in self._rows():
            yield {self.input: pixels}, f"image {index}" + ("" if labels is None else f" (label {labels[index]})")

    def pick(self, indices) -> dict[int, dict[str, np.ndarray]]:
        """{index: {input: [1, C, H, W]}} of the images at `indices` (after `check`), read row by row."""
        wanted = set(indices)
        return {index: {self.input: pixels} for index, pixels in self._rows(max(wanted, default=-1) + 1)
                if index in wanted}

    def _rows(self, stop: int | None = None):
        """(index, pixels [1, C, H, W]) of the first `stop` images (all by default), one row at a time."""
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.key + ".npy") as fh:
                shape, _, dtype = _npy_header(fh)
                size = int(np.prod(shape[1:])) * dtype.itemsize
                for index in range(shape[0] if stop is None else min(stop, shape[0])):
                    row = fh.read(size)
                    if len(row) != size:
                        raise ValueError(f"it ends inside image {index}")
                    yield index, np.frombuffer(row, dtype).reshape((1,) + tuple(shape[1:]))
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise LrpcError(f"corpus {self.path} cannot be read ({exc}); write it again with numpy.savez") from None


def _npy_header(fh) -> tuple[tuple, bool, np.dtype]:
    """(shape, Fortran order, dtype) of an .npy stream, leaving it at the first byte of the data."""
    version = np.lib.format.read_magic(fh)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f".npy format version {version} is not supported")
    shape, fortran, dtype = read(fh)
    if dtype.hasobject:
        raise ValueError("it holds Python objects")
    return shape, fortran, dtype


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the top-k state -----------------------------------------------------------------------------------

class TopK:
    """Per component and kind: the k best (score, sample, position) of every unit, best first; ties go to
    the earlier sample, so the result does not depend on how the corpus was split into batches."""

    def __init__(self, units: dict[str, int], k: int):
        self.k = k
        self.arrays = {}
        for name, n in units.items():
            for kind in KINDS:
                self.arrays[f"{name}/{kind}/score"] = np.full((n, k), -np.inf, np.float32)
                self.arrays[f"{name}/{kind}/sample"] = np.full((n, k), NO_SAMPLE, np.int64)
                self.arrays[f"{name}/{kind}/position"] = np.zeros((n, k), np.int64)

    def add(self, scores: dict, first: int) -> None:
        for name, s in scores.items():
            for kind in KINDS:
                key = f"{name}/{kind}"
                batch = s[kind].T                                    # [units, batch]
                ids = np.broadcast_to(np.arange(first, first + batch.shape[1]), batch.shape)
                score = np.concatenate([self.arrays[key + "/score"], batch], axis=1)
                sample = np.concatenate([self.arrays[key + "/sample"], ids], axis=1)
                position = np.concatenate([self.arrays[key + "/position"], s[kind + "_pos"].T], axis=1)
                order = np.lexsort((sample, -score))[:, :self.k]
                self.arrays[key + "/score"] = np.take_along_axis(score, order, 1)
                self.arrays[key + "/sample"] = np.take_along_axis(sample, order, 1)
                self.arrays[key + "/position"] = np.take_along_axis(position, order, 1)

    def referenced(self) -> set[int]:
        return {int(i) for key, a in self.arrays.items() if key.endswith("/sample") for i in a.ravel()
                if i != NO_SAMPLE}


# ---- building -----------------------------------------------------------------------------------------

def build(model, corpus, out, *, components: str = "mlp", k: int = 8, batch_size: int = 16,
          preset: str = "attnlrp", tokenizer=None, force: bool = False, progress: bool = True,
          cache=None) -> Path:
    """Stream `corpus` through the model and write the atlas `out` (SQLite). Resumes an interrupted build
    of the same model, corpus and options from `<out>.partial.npz`."""
    from lrpc import validate
    from lrpc.attributor import Attributor
    from lrpc.cache import model_hash
    from lrpc.components import parse
    k, batch_size = validate.at_least_one(k, "--k"), validate.at_least_one(batch_size, "--batch")
    selectors = ",".join(parse(components))
    out, corpus = Path(out), Path(corpus)
    inputs = safeio.input_files(model, corpus)
    safeio.check_output(out, force=force, inputs=inputs)
    source = Corpus(corpus)
    attributor = Attributor(model, tokenizer=tokenizer, preset=preset, components=selectors, cache=cache)
    total = source.size(attributor)
    units = {name: _units(attributor, name) for name in attributor.activations}
    config = {"format": FORMAT, "model": str(model), "model_digest": model_hash(model)[0], "preset": preset,
              "components": selectors, "k": k, "batch": batch_size, "corpus": corpus.name,
              "corpus_sha256": file_digest(corpus), "samples": total,
              "units": units, "tensors": attributor.activations}
    if source.images:
        config["images"] = source.images.key   # the sample ids are indices into this array
    partial = out.with_name(out.name + ".partial.npz")
    state, texts, done = TopK(units, k), {}, 0
    if partial.is_file() and not force:
        done, texts = _resume(partial, config, state)
    batch, stored = [], []
    for index, (sample, text) in enumerate(source.samples()):
        if index < done:
            continue
        batch.append(sample)
        stored.append(text)
        if len(batch) == batch_size or index == total - 1:
            state.add(attributor.unit_scores(batch), index + 1 - len(batch))
            texts.update(zip(range(index + 1 - len(batch), index + 1), stored))
            keep = state.referenced()
            texts = {i: t for i, t in texts.items() if i in keep}
            done = index + 1
            _save_state(partial, config, state, texts, done)
            batch, stored = [], []
            if progress:
                _progress(done, total)
    safeio.publish(out, lambda tmp: _write_sqlite(tmp, config, state, texts), force=force, inputs=inputs)
    partial.unlink(missing_ok=True)
    return out


def _units(attributor, name: str) -> int:
    component = next(c for c in attributor.meta["components"] if c["component"] == name)
    return int(component["units"])


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} samples", end="\n" if done == total else "",
          file=sys.stderr, flush=True)


def _save_state(partial: Path, config: dict, state: TopK, texts: dict, done: int) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, config=np.array(json.dumps(config, sort_keys=True)), done=np.array(done),
             texts=np.array(json.dumps({str(i): t for i, t in sorted(texts.items())})), **state.arrays)
    safeio.write_bytes(partial, buffer.getvalue(), force=True)   # lrpc's own file, replaced atomically


def _resume(partial: Path, config: dict, state: TopK) -> tuple[int, dict]:
    try:
        with np.load(partial) as saved:
            if json.loads(str(saved["config"])) != json.loads(json.dumps(config, sort_keys=True)):
                raise LrpcError(f"{partial} is an interrupted build with other arguments (model, corpus, "
                                "components, k or batch size): run again with those, or with --force to start over")
            for key in state.arrays:
                state.arrays[key] = saved[key]
            return int(saved["done"]), {int(i): t for i, t in json.loads(str(saved["texts"])).items()}
    except (OSError, ValueError, KeyError) as exc:
        raise LrpcError(f"{partial} (an interrupted build) cannot be read ({exc}); delete it or use --force") from None


def _write_sqlite(path: Path, config: dict, state: TopK, texts: dict) -> None:
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
            db.execute("CREATE TABLE refs (component TEXT NOT NULL, layer INTEGER NOT NULL, unit INTEGER NOT NULL, "
                       "kind TEXT NOT NULL, rank INTEGER NOT NULL, sample INTEGER NOT NULL, position INTEGER NOT NULL, "
                       "score REAL NOT NULL, PRIMARY KEY (component, layer, unit, kind, rank))")
            db.execute("CREATE INDEX refs_by_unit ON refs (layer, unit)")
            db.executemany("INSERT INTO metadata VALUES (?, ?)",
                           [(key, json.dumps(value)) for key, value in sorted(config.items())])
            db.executemany("INSERT INTO samples VALUES (?, ?)", sorted(texts.items()))
            for name in config["units"]:
                kind_name, layer = name.split(".")
                for kind in KINDS:
                    key = f"{name}/{kind}"
                    score, sample, position = (state.arrays[f"{key}/{f}"] for f in ("score", "sample", "position"))
                    db.executemany("INSERT INTO refs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                        (kind_name, int(layer), unit, kind, rank, int(sample[unit, rank]), int(position[unit, rank]),
                         float(score[unit, rank]))
                        for unit in range(score.shape[0]) for rank in range(score.shape[1])
                        if sample[unit, rank] != NO_SAMPLE])
    finally:
        db.close()


# ---- reading ------------------------------------------------------------------------------------------

class Reference(NamedTuple):
    """One reference of a unit: what the atlas shows of the sample (its text, or "image 12 (label 3)"), the
    position of the unit's score in it, the score, and the sample's index in the corpus (an image's row)."""
    text: str
    position: int
    score: float
    sample: int


class Atlas:
    """A concept atlas written by `lrpc concepts build` (read-only).

    `Atlas(path, model=None)`: with `model`, an atlas built from another model is refused.
    `references(component, unit, kind="rel", n=None)` → [Reference(text, position, score, sample), …], best
    first."""

    def __init__(self, path, model=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise LrpcError(f"atlas {self.path} does not exist; build one with `lrpc concepts build`")
        try:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            self.meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM metadata")}
            self.db.execute("SELECT count(*) FROM refs").fetchone()
        except (sqlite3.DatabaseError, ValueError) as exc:
            raise LrpcError(f"{self.path} is not a readable lrpc atlas ({exc}); build it again with "
                            "`lrpc concepts build`") from None
        if self.meta.get("format") != FORMAT:
            raise LrpcError(f"{self.path} is not an lrpc atlas (format {self.meta.get('format')!r}, expected {FORMAT})")
        if model is not None:
            from lrpc.cache import model_hash
            if model_hash(model)[0] != self.meta["model_digest"]:
                raise LrpcError(f"{self.path} was built from another model ({self.meta['model']}); build an atlas "
                                f"for {model} with `lrpc concepts build`")

    @property
    def components(self) -> dict[str, int]:
        return dict(self.meta["units"])

    def references(self, component: str, unit: int, kind: str = "rel", n: int | None = None) -> list[Reference]:
        kind_name, layer = component.split(".")
        rows = self.db.execute(
            "SELECT s.text, r.position, r.score, r.sample FROM refs r JOIN samples s ON s.id = r.sample "
            "WHERE r.component = ? AND r.layer = ? AND r.unit = ? AND r.kind = ? ORDER BY r.rank"
            + (" LIMIT ?" if n else ""), (kind_name, int(layer), int(unit), kind) + ((n,) if n else ()))
        return [Reference(*row) for row in rows]

    def close(self) -> None:
        self.db.close()


# ---- explaining with an atlas ---------------------------------------------------------------------------

def explain(model, text: str | None, atlas: Atlas, *, image=None, corpus=None, top: int = 3, refs: int = 3,
            tokenizer=None, preset: str = "attnlrp", cache=None, pictures: bool = False) -> dict:
    """The `top` most positive and most negative units for the prediction on `text` (a text atlas) or
    `image` (an image atlas: a picture file, or a .npy / array [C, H, W] preprocessed as the corpus), each
    with its RelMax references from the atlas and, per reference, CRP's conditional heatmap: the relevance
    of the reference's tokens (or pixels, summed over channels: [H, W]) for its own prediction that flows
    through that unit alone (docs/design.md, "Conditional heatmaps"). An image atlas shows its references'
    pixels from `corpus`, the .npz it was built from (checked by its SHA-256). One explainer, compiled with
    the atlas's components and their masks (cached), serves the sample, every unit and every reference; a
    unit's references run as one batch. `pictures=True` adds to each image reference its "picture" (H×W×3
    uint8: the corpus pixels with the model's normalisation undone), for drawing the heatmap over it."""
    from lrpc import validate
    from lrpc.attributor import Attributor
    top, refs = validate.at_least_one(top, "--top"), validate.at_least_one(refs, "--refs")
    selectors = atlas.meta["components"]
    attributor = Attributor(model, tokenizer=tokenizer, preset=preset, components=selectors, conditions=selectors,
                            cache=cache)
    images = _corpus_images(atlas, corpus, attributor) if "images" in atlas.meta else None
    sample = _explained_image(atlas, attributor, image) if images else _explained_text(atlas, text, image)
    relevance = {name: s["rel"][0] for name, s in attributor.unit_scores([sample]).items()}
    flat = sorted(((float(r[u]), name, u) for name, r in relevance.items() for u in range(len(r))),
                  key=lambda x: (-x[0], x[1], x[2]))
    chosen = [x for x in flat[:top] if x[0] > 0] + [x for x in reversed(flat[-top:]) if x[0] < 0]
    found = {(name, unit): atlas.references(name, unit, "rel", refs) for _, name, unit in chosen}
    pixels = images.pick(r.sample for rs in found.values() for r in rs) if images else {}
    units = []
    for value, name, unit in chosen:
        shown = found[name, unit]
        heatmaps = attributor.conditional([pixels[r.sample] if images else r.text for r in shown], name, unit) \
            if shown else []
        references = [{"text": r.text, "sample": r.sample, "position": r.position, "score": r.score,
                       **(_image_heatmap(heat) if images else _token_heatmap(attributor, r.text, heat)),
                       **({"picture": _picture(attributor, pixels[r.sample])} if images and pictures else {})}
                      for r, heat in zip(shown, heatmaps)]
        units.append({"component": name, "unit": unit, "relevance": value, "references": references})
    said = {"image": str(image)} if images else {"text": text}
    return {"model": str(model), **said, "units": units}


def _token_heatmap(attributor, text: str, heat: np.ndarray) -> dict:
    return {"tokens": attributor.tokenizer.encode(text)[1], "heatmap": [float(r) for r in heat]}


def _image_heatmap(heat: np.ndarray) -> dict:
    """The per-pixel map [H, W]: relevance summed over the channels (as `lrpc explain --image` shows it)."""
    return {"heatmap": np.asarray(heat, np.float64).sum(axis=0).tolist()}


def _picture(attributor, pixels: dict) -> np.ndarray:
    """The H×W×3 uint8 picture of preprocessed pixels [1, C, H, W]: (x · std + mean) · 255."""
    x = next(iter(pixels.values()))[0].transpose(1, 2, 0)
    rgb = x * np.asarray(attributor.image_std, np.float32) + np.asarray(attributor.image_mean, np.float32)
    return (rgb * 255).round().clip(0, 255).astype(np.uint8)


def _explained_text(atlas: Atlas, text, image) -> str:
    if image is not None or text is None:
        raise LrpcError(f"{atlas.path} was built from a text corpus: explain a text (--text), not an image")
    return text


def _corpus_images(atlas: Atlas, corpus, attributor) -> NpzImages:
    """The atlas's own .npz corpus, whose rows its references index; any other file is refused."""
    name = atlas.meta["corpus"]
    if corpus is None:
        raise LrpcError(f"{atlas.path} was built from the image corpus {name}: pass it with --corpus to show the "
                        "references' pixels")
    corpus = Path(corpus)
    if not corpus.is_file():
        raise LrpcError(f"corpus {corpus} does not exist; pass {name}, the corpus {atlas.path} was built from")
    if file_digest(corpus) != atlas.meta["corpus_sha256"]:
        raise LrpcError(f"corpus {corpus} is not the {name} that {atlas.path} was built from (its SHA-256 differs): "
                        "pass that file, or build an atlas from this one")
    images = NpzImages(corpus)
    images.check(attributor)
    return images


def _explained_image(atlas: Atlas, attributor, image):
    """What `unit_scores` takes for the explained image: a picture file's path (resized and normalised by
    the Attributor), or {input: [1, C, H, W]} from a preprocessed .npy / array of exactly the model's size."""
    from lrpc.inputs import IMAGE_SUFFIXES
    if image is None:
        raise LrpcError(f"{atlas.path} was built from images: explain an image (--image), not a text")
    if not isinstance(image, np.ndarray):
        path = Path(image)
        if not path.is_file():
            raise LrpcError(f"image {path} does not exist")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return str(path)
        if path.suffix.lower() != ".npy":
            raise LrpcError(f"image {path} is neither a picture ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a .npy "
                            "array [C, H, W] preprocessed as the corpus")
        try:
            image = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LrpcError(f"image {path} is not a readable .npy array ({exc}); save it with numpy.save") from None
    name = attributor.main_input
    want = list(attributor.explainer.inputs[name].shape[1:])
    if list(image.shape[-3:]) != want or image.ndim not in (3, 4) or image.size != np.prod(want) \
            or image.dtype.kind != "f":
        raise LrpcError(f"the image is {image.dtype} {list(image.shape)}; the model takes floats "
                        f"[{', '.join(map(str, want))}] (or [1, …]), preprocessed as the corpus")
    return {name: np.ascontiguousarray(image, np.float32).reshape([1] + want)}
