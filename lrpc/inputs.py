"""Reading what users explain: text through a tokenizer, images, .npz arrays and JSON-lines files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrpc import validate
from lrpc.errors import LrpcError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# A word-level toy tokenizer for the tiny random-weight zoo models (vocabulary 128, ids 0/1/2 are
# pad/bos/eos as in the zoo configs), so `lrpc explain llama --text "…"` shows readable tokens.
TOY_WORDS = ("the a an of to in on at by for with from and or but not no is are was were be been has have "
             "had do does did will would can could should may might must i you he she it we they me him her "
             "us them my your his its our their this that these those what which who where when why how all "
             "some any each every one two three many much more most other so "
             "just now then here there up down out over under cat dog sat mat sun moon good bad "
             "great movie film book love hate happy sad big small red blue green day night house tree water "
             "fire city man woman . , ! ?").split()


class Tokenizer:
    """A `tokenizers.Tokenizer` with what lrpc needs: encode with special tokens, token ↔ id, pad id."""

    def __init__(self, backend, pad_id: int | None = None):
        self.backend = backend
        if pad_id is None:
            padding = getattr(backend, "padding", None)
            pad_id = padding.get("pad_id") if padding else None
            for name in ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"):
                if pad_id is None and backend.token_to_id(name) is not None:
                    pad_id = backend.token_to_id(name)
        self.pad_id = int(pad_id or 0)
        self.backend.no_padding()
        self.backend.no_truncation()

    @classmethod
    def load(cls, where: str | os.PathLike) -> Tokenizer:
        path = Path(where)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise LrpcError(f"no tokenizer.json in {where}: pass --tokenizer DIR (a folder with tokenizer.json)")
        pad = None
        config = file.parent / "config.json"
        if config.is_file():
            try:
                pad = json.loads(config.read_text()).get("pad_token_id")
            except (ValueError, AttributeError):
                raise LrpcError(f"{config} is not a JSON object: fix it, or give the tokenizer.json file "
                                "itself") from None
        return cls(read_tokenizer_file(file), pad)

    @classmethod
    def from_object(cls, obj) -> Tokenizer:
        """A tokenizer object people already hold: a `tokenizers.Tokenizer` or a transformers fast tokenizer
        (its `backend_tokenizer`). lrpc works on a copy: the caller's padding / truncation stay as they are."""
        backend = getattr(obj, "backend_tokenizer", obj)
        if not (hasattr(backend, "to_str") and hasattr(backend, "token_to_id")):
            raise LrpcError(f"tokenizer: a {type(obj).__name__} is not one lrpc can use: give a folder with "
                            "tokenizer.json, a tokenizers.Tokenizer, or a transformers fast tokenizer (use_fast=True)")
        from tokenizers import Tokenizer as Backend
        return cls(Backend.from_str(backend.to_str()), getattr(obj, "pad_token_id", None))

    @classmethod
    def toy(cls) -> Tokenizer:
        """Word-level, 128 ids: [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3 and 124 English words (zoo models)."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import models as tm
        from tokenizers import normalizers, pre_tokenizers
        punctuation = [".", ",", "!", "?"]
        words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", *punctuation, *[w for w in TOY_WORDS if w not in punctuation]]
        vocab = {w: i for i, w in enumerate(words[:128])}
        backend = Backend(tm.WordLevel(vocab, unk_token="[UNK]"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return cls(backend, 0)

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        ids, tokens, _ = self.encode_with_offsets(text)
        return ids, tokens

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[str], list[tuple[int, int]]]:
        """(ids, tokens, offsets): each token's [start, end) characters in `text` ((0, 0) for added
        special tokens such as [CLS])."""
        enc = self.backend.encode(text)
        return list(enc.ids), list(enc.tokens), [tuple(o) for o in enc.offsets]

    def token_id(self, token: str) -> int:
        for candidate in (token, "Ġ" + token.lstrip(), "▁" + token.lstrip()):
            found = self.backend.token_to_id(candidate)
            if found is not None:
                return int(found)
        ids = self.backend.encode(token, add_special_tokens=False).ids
        return validate.known_token(token, list(ids), self.unknown_id())

    def unknown_id(self) -> int | None:
        """The id of the tokenizer's unknown token (None when its model has none, e.g. byte-level BPE)."""
        unknown = getattr(self.backend.model, "unk_token", None)
        return None if unknown is None else self.backend.token_to_id(unknown)

    def token(self, index: int) -> str:
        return self.backend.id_to_token(int(index)) or str(index)


def read_tokenizer_file(file: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json, or one line saying the file is not one."""
    from tokenizers import Tokenizer as Backend
    try:
        return Backend.from_file(str(file))
    except Exception as exc:  # noqa: BLE001  (tokenizers raises a bare Exception for every parse error)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LrpcError(f"{file} is not a tokenizer.json the tokenizers library can read ({first}): give the "
                        "model's own tokenizer") from None


def load_image(source, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [1, 3, H, W] float32, the picture as H0×W0×3 uint8). The image is converted to RGB,
    resized (bicubic) to the model's H×W, scaled to [0, 1] and normalised per channel: (x − mean) / std,
    ImageNet statistics by default (a Hugging Face folder's preprocessor_config.json overrides them)."""
    from PIL import Image
    if isinstance(source, np.ndarray):
        picture = Image.fromarray(source.astype(np.uint8)).convert("RGB")
    elif isinstance(source, Image.Image):
        picture = source.convert("RGB")
    else:
        try:
            picture = Image.open(source).convert("RGB")
        except (OSError, ValueError) as exc:
            raise LrpcError(f"cannot read the image {source}: {exc}") from None
    original = np.asarray(picture, np.uint8)
    resized = np.asarray(picture.resize((size[1], size[0]), Image.BICUBIC), np.float32) / 255.0
    x = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32), original


def read_npz(path: Path) -> dict:
    if not path.is_file():
        raise LrpcError(f"{path} does not exist")
    how = "save the inputs by name with np.savez(path, input_ids=…, …)"
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):  # a .npy holds one array and no name to feed it by
            raise LrpcError(f"{path} is a .npy file (one unnamed array), not an .npz; {how}")
        with data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise LrpcError(f"{path} is not a NumPy .npz file ({exc}); {how}") from None


SPEC_KEYS = ("target", "contrast", "position", "top_k")   # per-line target options of a batch file


@dataclass
class BatchLine:
    """One line of a batch file: what to explain (text, an image path or a dict of arrays) with its own
    target options, or why it cannot be explained (then `item` is None)."""
    number: int                       # 1-based line number in the file
    id: str                           # the line's "id", else its line number
    item: object = None
    spec: dict = field(default_factory=dict)
    error: str | None = None


def parse_line(raw: str, number: int, folder: Path, defaults: dict) -> BatchLine | None:
    """A JSON line as a `BatchLine` (None for a blank line): {"text": …}, {"image": PATH}, {"npz": PATH}
    (paths relative to the file's folder) or {"inputs": {name: array}}, optionally with "id", "target",
    "contrast", "position", "top_k". A line that cannot be read becomes an error, never an exception."""
    if not raw.strip():
        return None
    spec = {k: defaults.get(k) for k in SPEC_KEYS}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return BatchLine(number, str(number), spec=spec, error=f"line {number}: not JSON ({exc})")
    if isinstance(doc, str):
        doc = {"text": doc}
    if not isinstance(doc, dict):
        return BatchLine(number, str(number), spec=spec, error=f'line {number}: expected an object like {{"text": "…"}}')
    line = BatchLine(number, str(doc["id"]) if doc.get("id") is not None else str(number),
                     spec={k: doc.get(k, spec[k]) for k in SPEC_KEYS})
    try:
        if isinstance(doc.get("text"), str):
            line.item = doc["text"]
        elif isinstance(doc.get("image"), str):
            line.item = Path(folder, doc["image"])
            if line.item.suffix.lower() not in IMAGE_SUFFIXES or not line.item.is_file():
                raise LrpcError(f"image {line.item} not found (or not an image file)")
        elif isinstance(doc.get("npz"), str):
            line.item = read_npz(Path(folder, doc["npz"]))
        elif isinstance(doc.get("inputs"), dict):
            line.item = {k: np.asarray(v) for k, v in doc["inputs"].items()}
        else:
            raise LrpcError('give "text" (a string), "image" or "npz" (a path) or "inputs" (an object of arrays)')
    except (LrpcError, ValueError) as exc:
        line.item, line.error = None, f"line {number}: {exc}"
    return line


def read_jsonl(path: Path, defaults: dict) -> list[BatchLine]:
    """Every non-blank line of a JSON-lines batch file (`parse_line`); bad lines are kept as errors."""
    if not path.is_file():
        raise LrpcError(f"{path} does not exist")
    lines = [line for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if (line := parse_line(raw, number, path.parent, defaults)) is not None]
    if not lines:
        raise LrpcError(f"{path} has no inputs")
    return lines
