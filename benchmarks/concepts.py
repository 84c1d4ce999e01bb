"""Is latent relevance a faithful ranking of units? Switch off (or keep only) the top-k MLP units of a layer,
ranked five ways, through the `--intervene` scale inputs, and measure the explained value, on three trained
models:

  synthetic  the key-token classifier of benchmarks/faithfulness.py (trained here, same seed and data):
             the predicted class's logit; MLP layers 0 and 1 (64 units each)
  vit        the ViT on 8×8 digits of benchmarks/faithfulness.py (trained here): the predicted class's
             logit; MLP layers 0 and 1 (96 units each)
  minilm     all-MiniLM-L6-v2: the cosine similarity e_A · e_B of the pairs in models/data/sentence_pairs.tsv,
             sentence A's units scaled; MLP layer 3 (1,536 units)

Rankings, per sample, all for the explained value:
  attnlrp    the units' AttnLRP relevance (relevance.mlp.<layer>)
  attnlrp-γ  AttnLRP with the γ-rule on the linear layers (and the patch convolution), the settings of
             benchmarks/faithfulness.py (conv 0.25, linear 0.05); not run on MiniLM
  gxi        gradient × activation (the gxi preset's relevance.mlp.<layer>)
  act        activation summed over the sample's positions
  random     a seeded permutation

A faithful ranking makes the value drop fastest when its top units are removed, and recover fastest when
only they are kept (keep-only k = 0: every unit off). On the synthetic task, whose evidence is known, it
also builds a concept atlas (`lrpc concepts build`, a corpus of fresh sequences) and reports how often the
references of each ranking's top units peak on a key token; on the digits, over an .npz of held-out
digits, how often they show the explained image's digit. Writes docs/concepts/results.{json,md} and
one <model>-ablation.png per model:

    python benchmarks/concepts.py                         # ~2.5 min of CPU (10 min wall on a loaded 2-core box)
    python benchmarks/concepts.py --models synthetic,vit  # ~1 min of CPU; results.* then hold only these
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import faithfulness as trained  # noqa: E402  (the trained models: the same data, seeds and training)

METHODS = ("attnlrp", "attnlrp-γ", "gxi", "act", "random")
LABELS = {"attnlrp": "AttnLRP", "attnlrp-γ": "AttnLRP γ", "gxi": "gradient × activation", "act": "activation",
          "random": "random"}
GAMMA = dict(zip(("gamma_conv", "gamma_linear"), trained.GAMMA))
TOP_UNITS, REFS = 3, 8        # evidence statistic: units per explained sample, references per unit


@dataclass
class Layer:
    """The curves of one model layer: per method, samples × k of the explained value."""
    model: str
    explained: str
    component: str
    units: int
    ks: list[int]
    remove: dict = field(default_factory=dict)
    keep: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)     # per method and sample: its TOP_UNITS best units

    def add(self, scores: dict, value) -> None:
        """One sample: `scores` per method ([units]), `value(factors)` the explained value with these
        intervention factors on the layer's units."""
        for method, s in scores.items():
            order = np.argsort(-s, kind="stable")
            remove, keep = [], []
            for k in self.ks:
                on = np.zeros(self.units, np.float32)
                on[order[:k]] = 1.0
                remove.append(value(1.0 - on))
                keep.append(value(on))
            self.remove.setdefault(method, []).append(remove)
            self.keep.setdefault(method, []).append(keep)
            self.top.setdefault(method, []).append(order[:TOP_UNITS])

    def summary(self) -> dict:
        from lrpc.faithfulness import aopc
        curves = {"remove_top_k": self.remove, "keep_only_top_k": self.keep}
        return {"model": self.model, "explained": self.explained, "component": self.component, "units": self.units,
                "samples": len(next(iter(self.remove.values()))), "k": self.ks,
                **{key: {m: np.mean(c, 0).round(4).tolist() for m, c in v.items()} for key, v in curves.items()},
                # removal: mean drop over the k points (higher: the ranking finds what the value rests on);
                # keep-only: mean value over the k points (higher: the top units carry the value alone)
                "removal_aopc": {m: round(aopc(np.array(c)), 4) for m, c in self.remove.items()},
                "keep_mean": {m: round(float(np.mean(c)), 4) for m, c in self.keep.items()}}


def powers(units: int) -> list[int]:
    return [0] + [2 ** i for i in range(int(np.log2(units)) + 1)] + ([units] if units & (units - 1) else [])


# ---- the classifiers trained here ------------------------------------------------------------------------

def classifier_layers(name: str, path: Path, feeds: list[dict], explained: str, rng) -> list[Layer]:
    """Rank and ablate every MLP layer of a classifier on each feed, for its predicted class's logit."""
    import onnx

    import lrpc
    from lrpc.attributor import Attributor
    proto = onnx.load(path)
    # attnlrp relevance per position + activations; compiled into the work folder, not the user's cache
    ranked = Attributor(str(path), components="mlp", cache=path.parent / "cache")
    ex = ranked.explainer
    gxi = lrpc.Explainer(lrpc.compile(proto, preset="gxi", seed="vector", components="mlp", intervene="mlp"))
    gamma = lrpc.Explainer(lrpc.compile(proto, preset="attnlrp", seed="vector", components="mlp", **GAMMA))
    units = {c["component"]: int(c["units"]) for c in gxi.meta["components"]}
    layers = {n: Layer(name, explained, n, u, powers(u)) for n, u in units.items()}
    for feed in feeds:
        forward = ex.forward(feed)
        logits = forward[ex.explained][0]
        target = int(logits.argmax())
        seed = np.eye(len(logits), dtype=np.float32)[[target]]
        relevance = {"attnlrp": ex.explain(feed, seed=seed).relevance, "gxi": gxi.explain(feed, seed=seed).relevance,
                     "attnlrp-γ": gamma.explain(feed, seed=seed).relevance}
        for n, layer in layers.items():
            scores = {"attnlrp": relevance["attnlrp"][n][0].sum(0), "attnlrp-γ": relevance["attnlrp-γ"][n][0],
                      "gxi": relevance["gxi"][n][0], "act": forward[ranked.activations[n]][0].sum(0),
                      "random": rng.permutation(layer.units).astype(np.float32)}
            layer.add(scores, lambda factors, n=n: float(
                gxi.forward(feed, scales={n: factors})[gxi.explained][0, target]))
    return list(layers.values())


def run_synthetic(work: Path, n: int, corpus: int, rng) -> tuple[list[Layer], dict]:
    start = time.perf_counter()
    model, accuracy = trained.train_classifier()
    trained_s = time.perf_counter() - start
    path = trained.export(model, {"input_ids": np.zeros((2, trained.SYN_LEN), np.int64)}, work / "synthetic.onnx")
    ids, _, _ = trained.synthetic_data(n, np.random.default_rng(7))
    feeds = [{"input_ids": ids[i:i + 1]} for i in range(n)]
    layers = classifier_layers("synthetic key-token classifier", path, feeds, "predicted class's logit", rng)
    stats = synthetic_references(work, path, ids, layers, corpus)
    return layers, {"accuracy": accuracy, "train_seconds": round(trained_s, 1), **stats}


def run_vit(work: Path, n: int, rng) -> tuple[list[Layer], dict]:
    start = time.perf_counter()
    model, accuracy, images, labels = trained.train_vit()
    trained_s = time.perf_counter() - start
    path = trained.export(model, {"pixel_values": images[:2]}, work / "vit-digits.onnx")
    feeds = [{"pixel_values": images[i:i + 1]} for i in range(n)]
    layers = classifier_layers("ViT on 8×8 digits", path, feeds, "predicted class's logit", rng)
    # the atlas corpus: the held-out digits not explained
    stats = digits_references(work, path, labels[:n], layers, images[n:], labels[n:])
    return layers, {"accuracy": accuracy, "train_seconds": round(trained_s, 1), **stats}


# ---- what the references of the top units show -----------------------------------------------------------

def reference_rates(book, layers: list[Layer], tests: dict) -> dict:
    """For each explained sample and ranking, the TOP_UNITS top units of each layer and their REFS RelMax /
    ActMax references in the atlas `book`: how often each test(explained index, reference sample id,
    reference position) holds. The atlas is plain SQLite; its sample ids index the corpus."""
    from lrpc import atlas
    hits = {(kind, m, t): [] for kind in atlas.KINDS for m in METHODS for t in tests}
    for layer in layers:
        kind_name, number = layer.component.split(".")
        for method in METHODS:
            for i, units in enumerate(layer.top[method]):
                for unit in units:
                    for kind in atlas.KINDS:
                        refs = book.db.execute("SELECT sample, position FROM refs WHERE component = ? AND layer = ? "
                                               "AND unit = ? AND kind = ? ORDER BY rank LIMIT ?",
                                               (kind_name, int(number), int(unit), kind, REFS)).fetchall()
                        for t, test in tests.items():
                            hits[kind, method, t] += [test(i, sample, position) for sample, position in refs]
    return {kind: {m: {t: round(float(np.mean(hits[kind, m, t])), 3) for t in tests} for m in METHODS}
            for kind in atlas.KINDS}


def token_name(i: int) -> str:
    return f"KEY{i}" if i in trained.KEYS else f"w{i}"


def synthetic_references(work: Path, path: Path, ids: np.ndarray, layers: list[Layer], size: int) -> dict:
    """An atlas over `size` fresh sequences (a text corpus, one token name per id): how often a top unit's
    reference peaks (its stored position: where the unit's relevance / activation was largest) on a key
    token, and on one of the explained sequence's own two keys. Every sequence holds two keys, so "the
    reference contains a key" is always true; the peak is what tells a key detector from a filler one."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from lrpc import atlas
    from lrpc.inputs import Tokenizer
    vocab = {"[PAD]": 0, **{token_name(i): i for i in range(1, trained.SYN_VOCAB)}}
    backend = Backend(WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = WhitespaceSplit()
    corpus_ids, _, _ = trained.synthetic_data(size, np.random.default_rng(11))
    corpus = work / "synthetic-corpus.txt"
    corpus.write_text("".join(" ".join(token_name(int(t)) for t in row) + "\n" for row in corpus_ids))
    start = time.perf_counter()
    book = atlas.Atlas(atlas.build(path, corpus, work / "synthetic.atlas", components="mlp", k=REFS, batch_size=64,
                                   tokenizer=Tokenizer.from_object(backend), progress=False, cache=work / "cache"))
    built = time.perf_counter() - start
    keys = set(trained.KEYS)
    own = [set(row.tolist()) & keys for row in ids]
    rates = reference_rates(book, layers, {
        "peak on a key": lambda i, sample, position: corpus_ids[sample, position] in keys,
        "peak on an own key": lambda i, sample, position: corpus_ids[sample, position] in own[i]})
    return {"references": rates, "atlas_samples": size, "atlas_seconds": round(built, 1),
            "note": "Every sequence holds two keys, so a reference always contains a key; whether the unit "
                    "peaks on one is what tells a key detector from a filler one.",
            "chance": {"peak on a key": round(2 / trained.SYN_LEN, 3),
                       "peak on an own key": round(1 / trained.SYN_LEN, 3)}}


def digits_references(work: Path, path: Path, labels: np.ndarray, layers: list[Layer], images: np.ndarray,
                      image_labels: np.ndarray) -> dict:
    """An atlas over held-out digits (an .npz image corpus with labels): how often a top unit's references
    show the explained image's own digit."""
    from lrpc import atlas
    corpus = work / "digits.npz"
    np.savez(corpus, images=images, labels=image_labels)
    start = time.perf_counter()
    book = atlas.Atlas(atlas.build(path, corpus, work / "digits.atlas", components="mlp", k=REFS, batch_size=64,
                                   progress=False, cache=work / "cache"))
    built = time.perf_counter() - start
    rates = reference_rates(book, layers, {
        "same digit": lambda i, sample, position: image_labels[sample] == labels[i]})
    chance = float(np.mean([np.mean(image_labels == label) for label in labels]))
    return {"references": rates, "atlas_samples": len(images), "atlas_seconds": round(built, 1),
            "chance": {"same digit": round(chance, 3)}}


# ---- MiniLM ------------------------------------------------------------------------------------------------

def pairs(n: int) -> list[tuple[str, str]]:
    from lrpc import models
    path = Path(models.__file__).parent / "data" / "sentence_pairs.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [(a, b) for a, b in rows][:n]


def run_minilm(n: int, layer_index: int, rng) -> tuple[list[Layer], dict]:
    import lrpc
    from lrpc import models
    from lrpc.attributor import Attributor
    name = f"mlp.{layer_index}"
    ranked = Attributor("minilm-sentence", components="mlp")          # attnlrp relevance + activations
    ex = ranked.explainer
    gxi = lrpc.Explainer(lrpc.compile(models.get("minilm-sentence").export(), preset="gxi", seed="vector",
                                      components="mlp", intervene="mlp"))
    units = int(next(c["units"] for c in gxi.meta["components"] if c["component"] == name))
    layer = Layer("all-MiniLM-L6-v2", "cosine similarity e_A · e_B (sentence A's units scaled)", name, units,
                  [0, 4, 16, 64, 256, 1024])
    for a, b in pairs(n):
        feed, lengths = ranked.pad(ranked._items([a, b]))
        forward = ex.forward(feed)
        e = forward[ex.explained]
        seed = e[::-1].copy()                  # row A seeded with e_B: s = e_A · e_B
        first = {k: v[:1] for k, v in feed.items()}
        scores = {"attnlrp": ex.explain(feed, seed=seed).relevance[name][0].sum(0),
                  "gxi": gxi.explain(first, seed=seed[:1]).relevance[name][0],
                  "act": forward[ranked.activations[name]][0, :lengths[0]].sum(0),
                  "random": rng.permutation(units).astype(np.float32)}
        layer.add(scores, lambda factors: float(gxi.forward(first, scales={name: factors})[gxi.explained][0] @ e[1]))
    return [layer], {}


# ---- output ------------------------------------------------------------------------------------------------

def plot(layers: list[Layer], path: Path) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrpc import safeio
    from lrpc.faithfulness import COLORS
    colors = {"attnlrp": COLORS["attnlrp"], "attnlrp-γ": "#8c564b", "gxi": COLORS["gxi"], "act": "#17becf",
              "random": COLORS["random"]}
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 3.4 * len(layers)), squeeze=False)
    for row, layer in zip(axes, layers):
        summary = layer.summary()
        x = np.arange(len(layer.ks))
        for ax, key, title in zip(row, ("remove_top_k", "keep_only_top_k"), ("remove the top-k units",
                                                                             "keep only the top-k units")):
            for method, values in summary[key].items():
                ax.plot(x, values, marker="o", ms=3, label=LABELS[method], color=colors[method])
            ax.set_xticks(x, [str(k) for k in layer.ks])
            ax.set_xlabel(f"k (of {layer.units} units of {layer.component})")
            ax.set_ylabel(f"mean {layer.explained.split(' (')[0]}", fontsize=8)
            ax.set_title(f"{layer.model}: {title}", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    safeio.write_bytes(path, buffer.getvalue(), force=True)


def markdown(results: dict, command: str) -> str:
    lines = ["# Concepts benchmark: does latent relevance rank units faithfully?", "",
             f"Generated by `{command}` (benchmarks/concepts.py; curves in the `*-ablation.png` files beside this",
             "one). Per model and MLP layer, each sample's units are ranked five ways and the top k switched off",
             "(or all others switched off) through the `--intervene` scale inputs. **Remove AOPC**: the mean drop",
             "of the explained value over the k points (higher is more faithful). **Keep mean**: the mean value",
             "over the k points when only the top k are kept (higher: the top units carry the value alone).", ""]
    for model, entry in results["models"].items():
        info = entry["info"]
        lines += [f"## {entry['layers'][0]['model']}", "",
                  f"Explained value: {entry['layers'][0]['explained']}; {entry['layers'][0]['samples']} samples"
                  + (f"; test accuracy {info['accuracy']:.3f}" if "accuracy" in info else "") + ".", "",
                  f"![{model}]({model}-ablation.png)", "",
                  "| layer | ranking | remove AOPC | keep mean | value, top k removed: " +
                  " / ".join(f"k={k}" for k in entry["layers"][0]["k"]) + " |", "|---|---|---|---|---|"]
        verdicts = []
        for layer in entry["layers"]:
            removal, keep = layer["removal_aopc"], layer["keep_mean"]
            best, best_keep = max(removal, key=removal.get), max(keep, key=keep.get)
            for m in removal:
                bold, bold_keep = ("**" if m == best else ""), ("**" if m == best_keep else "")
                lines.append(f"| {layer['component']} | {LABELS[m]} | {bold}{removal[m]:.3f}{bold} | "
                             f"{bold_keep}{keep[m]:.3f}{bold_keep} | "
                             + " / ".join(f"{v:.3g}" for v in layer["remove_top_k"][m]) + " |")
            verdicts.append(f"- {layer['component']}: removal best {LABELS[best]}"
                            + ("" if best == "attnlrp" else f" ({removal[best]:.3f}; AttnLRP {removal['attnlrp']:.3f})")
                            + f"; keep-only best {LABELS[best_keep]}"
                            + ("" if best_keep == "attnlrp" else f" ({keep[best_keep]:.3f}; AttnLRP {keep['attnlrp']:.3f})"))
        lines += [""] + verdicts
        if "references" in info:
            tests = list(info["chance"])
            lines += ["", f"What the references of the top {TOP_UNITS} units per sample and layer show ({REFS} per "
                      f"unit, from an atlas over {info['atlas_samples']} samples not explained: "
                      f"`lrpc concepts build`): " + "; ".join(f"{t} (chance {c:.3f})" for t, c in info["chance"].items())
                      + ". " + " ".join(filter(None, [info.get("note"), "The random ranking's row is the "
                                                       "baseline for the atlas itself."])), "",
                      "| ranking | " + " | ".join(f"RelMax: {t} | ActMax: {t}" for t in tests) + " |",
                      "|---|" + "---|---|" * len(tests)]
            rates = info["references"]
            for m in METHODS:
                lines.append(f"| {LABELS[m]} | " + " | ".join(f"{rates['rel'][m][t]:.3f} | {rates['act'][m][t]:.3f}"
                                                                for t in tests) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="synthetic,vit,minilm", help="comma-separated: synthetic, vit, minilm")
    parser.add_argument("--samples", type=int, default=64, help="explained samples per trained classifier")
    parser.add_argument("--pairs", type=int, default=24, help="MiniLM sentence pairs")
    parser.add_argument("--layer", type=int, default=3, help="MiniLM's MLP layer")
    parser.add_argument("--corpus", type=int, default=512, help="sequences in the synthetic task's atlas")
    parser.add_argument("--out", default=str(ROOT / "docs" / "concepts"))
    args = parser.parse_args()
    from lrpc import safeio
    trained._torch()                        # one torch thread (see faithfulness.THREADS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            rng = np.random.default_rng(0)
            start = time.perf_counter()
            if model == "synthetic":
                layers, info = run_synthetic(work, args.samples, args.corpus, rng)
            elif model == "vit":
                layers, info = run_vit(work, args.samples, rng)
            elif model == "minilm":
                layers, info = run_minilm(args.pairs, args.layer, rng)
            else:
                parser.error(f"unknown model {model!r}: give synthetic, vit or minilm")
            info["seconds"] = round(time.perf_counter() - start, 1)
            plot(layers, out / f"{model}-ablation.png")
            results["models"][model] = {"info": info, "layers": [layer.summary() for layer in layers]}
            print(f"{model}: {info['seconds']} s", file=sys.stderr)
    command = "python benchmarks/concepts.py" + ("" if args.models == parser.get_default("models")
                                                 else f" --models {args.models}")
    safeio.write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n", force=True)
    safeio.write_text(out / "results.md", markdown(results, command), force=True)
    print(markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
