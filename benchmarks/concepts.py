"""Is latent relevance a faithful ranking of units? Switch off (or keep only) the top-k MLP units of one
layer of the trained MiniLM, ranked four ways, through the `--intervene` scale inputs, and measure the
explained value: the cosine similarity of the sentence pairs in models/data/sentence_pairs.tsv.

Rankings, per pair (all for s = e_A · e_B, the similarity, explained on sentence A):
  attnlrp   the units' AttnLRP relevance (relevance.mlp.<layer>)
  gxi       gradient × activation (the gxi preset's relevance.mlp.<layer>)
  act       activation summed over the sentence's tokens
  random    a seeded permutation

A faithful ranking makes s drop fastest when its top units are removed, and recover fastest when only
they are kept. Writes docs/concepts/ablation.json and ablation.png:

    python benchmarks/concepts.py --pairs 24 --layer 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KS = (0, 4, 16, 64, 256, 1024)
METHODS = ("attnlrp", "gxi", "act", "random")


def pairs(n: int) -> list[tuple[str, str]]:
    from lrpc import models
    path = Path(models.__file__).parent / "data" / "sentence_pairs.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [(a, b) for a, b in rows][:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--out", default="docs/concepts")
    args = parser.parse_args()

    import lrpc
    from lrpc import models, safeio
    from lrpc.attributor import Attributor
    name = f"mlp.{args.layer}"
    ranked = Attributor("minilm-sentence", components="mlp")          # attnlrp relevance + activations
    proto = models.get("minilm-sentence").export()
    gxi = lrpc.Explainer(lrpc.compile(proto, preset="gxi", seed="vector", components="mlp", intervene="mlp"))
    units = int(next(c["units"] for c in gxi.meta["components"] if c["component"] == name))
    rng = np.random.default_rng(0)
    drop = {m: np.zeros((0, len(KS))) for m in METHODS}
    keep = {m: np.zeros((0, len(KS))) for m in METHODS}
    for a, b in pairs(args.pairs):
        feed, lengths = ranked.pad(ranked._items([a, b]))
        ex = ranked.explainer
        forward = ex.forward(feed)
        e = forward[ex.explained]
        seed = e[::-1].copy()                  # row A seeded with e_B: s = e_A · e_B
        first = {k: v[:1] for k, v in feed.items()}
        score = {
            "attnlrp": ex.explain(feed, seed=seed).relevance[name][0].sum(0),
            "gxi": gxi.explain(first, seed=seed[:1]).relevance[name][0],
            "act": forward[ranked.activations[name]][0, :lengths[0]].sum(0),
            "random": rng.permutation(units).astype(np.float32),
        }
        for method, s in score.items():
            order = np.argsort(-s, kind="stable")
            row_drop, row_keep = [], []
            for k in KS:
                off = np.ones(units, np.float32)
                off[order[:k]] = 0.0
                on = 1.0 - off if k else np.ones(units, np.float32)
                row_drop.append(float(gxi.forward(first, scales={name: off})[gxi.explained][0] @ e[1]))
                row_keep.append(float(gxi.forward(first, scales={name: on})[gxi.explained][0] @ e[1]))
            drop[method] = np.vstack([drop[method], row_drop])
            keep[method] = np.vstack([keep[method], row_keep])
    result = {"model": "minilm-sentence", "component": name, "units": units, "pairs": args.pairs, "k": list(KS),
              "explained": "cosine similarity e_A · e_B, sentence A's units scaled",
              "remove_top_k": {m: drop[m].mean(0).round(4).tolist() for m in METHODS},
              "keep_only_top_k": {m: keep[m].mean(0).round(4).tolist() for m in METHODS}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    safeio.write_text(out / "ablation.json", json.dumps(result, indent=1) + "\n", force=True)
    _plot(result, out / "ablation.png")
    print(json.dumps(result, indent=1))
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrpc import safeio
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(result["k"]))
    for ax, key, title in zip(axes, ("remove_top_k", "keep_only_top_k"), ("remove the top-k units", "keep only the top-k units")):
        for method, values in result[key].items():
            ax.plot(x, values, marker="o", label=method)
        ax.set_xticks(x, [str(k) for k in result["k"]])
        ax.set_xlabel(f"k (of {result['units']} units of {result['component']})")
        ax.set_ylabel("mean cosine similarity")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    import io
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    safeio.write_bytes(path, buffer.getvalue(), force=True)


if __name__ == "__main__":
    sys.exit(main())
