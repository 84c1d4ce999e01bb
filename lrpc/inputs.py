"""Reading what users explain: text through a tokenizer, images, .npz arrays and JSON-lines files."""

from __future__ import annotations

import json
import os
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
        enc = self.backend.encode(text)
        return list(enc.ids), list(enc.tokens)

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


def read_jsonl(path: Path, defaults: dict) -> list[tuple[dict, list]]:
    """Lines grouped by target options (consecutive lines with the same options run as padded batches)."""
    if not path.is_file():
        raise LrpcError(f"{path} does not exist")
    groups: list[tuple[dict, list]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise LrpcError(f"{path}:{number}: not JSON ({exc})") from None
        if isinstance(doc, str):
            doc = {"text": doc}
        if not isinstance(doc, dict):
            raise LrpcError(f"{path}:{number}: expected an object like {{\"text\": \"…\"}}")
        if "text" in doc:
            item = str(doc["text"])
        elif "image" in doc:
            item = Path(path.parent, doc["image"])
            if item.suffix.lower() not in IMAGE_SUFFIXES or not item.is_file():
                raise LrpcError(f"{path}:{number}: image {item} not found (or not an image file)")
        elif "npz" in doc:
            item = read_npz(Path(path.parent, doc["npz"]))
        elif "inputs" in doc:
            item = {k: np.asarray(v) for k, v in doc["inputs"].items()}
        else:
            raise LrpcError(f"{path}:{number}: give \"text\", \"image\", \"npz\" or \"inputs\"")
        spec = {k: doc.get(k, defaults.get(k)) for k in ("target", "contrast", "position", "top_k")}
        if groups and groups[-1][0] == spec:
            groups[-1][1].append(item)
        else:
            groups.append((spec, [item]))
    if not groups:
        raise LrpcError(f"{path} has no inputs")
    return groups
