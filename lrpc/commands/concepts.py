"""lrpc concepts: build a concept atlas over a corpus, and explain a prediction with it."""

from __future__ import annotations

from lrpc.commands.common import add_force_option, add_preset_option

HELP = "concept atlases: what each unit responds to over a corpus (build), and which units drove a prediction (explain)"
EXAMPLES = """examples:
  lrpc concepts build minilm-sentence --corpus sentences.txt -o minilm.atlas --components mlp
  lrpc concepts build hf-vit --corpus images.npz -o vit.atlas --components mlp,heads
  lrpc concepts explain minilm-sentence --atlas minilm.atlas --text "a man is playing a guitar"
  lrpc concepts explain minilm-sentence --atlas minilm.atlas --text "…" --json
  lrpc concepts explain minilm-sentence --atlas minilm.atlas --text "…" --html concepts.html
  lrpc concepts explain hf-vit --atlas vit.atlas --corpus images.npz --image cat.png --html concepts.html
"""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="stream a corpus and keep, per unit, its top-k samples by activation "
                           "(ActMax) and by relevance for the sample's own prediction (RelMax)")
    build.add_argument("model", help="a zoo name, a Hugging Face folder or an ONNX file")
    build.add_argument("--corpus", required=True, metavar="FILE", help="one text per line, .jsonl with "
                       '{"text": …} per line, or .npz with images [N, C, H, W] (float, preprocessed as the model '
                       "takes them) and optional integer labels [N]")
    build.add_argument("-o", "--out", required=True, metavar="ATLAS", help="the atlas to write (SQLite)")
    build.add_argument("--components", default="mlp", metavar="mlp,heads,residual", help="which units (default mlp)")
    build.add_argument("--k", type=int, default=8, help="references kept per unit and kind (default 8)")
    build.add_argument("--batch", type=int, default=16, help="samples per run (default 16)")
    build.add_argument("--tokenizer", metavar="DIR", help="folder with tokenizer.json (default: the model's)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    add_preset_option(build)
    add_force_option(build, "-o (and start over instead of resuming an interrupted build)")
    explain = sub.add_parser("explain", help="the most relevant units of a prediction with their references")
    explain.add_argument("model")
    explain.add_argument("--atlas", required=True, help="an atlas built by `lrpc concepts build` from this model")
    sample = explain.add_mutually_exclusive_group(required=True)
    sample.add_argument("--text", help="the text to explain (an atlas built from a text corpus)")
    sample.add_argument("--image", metavar="IMG", help="the image to explain (an atlas built from an .npz): a picture, "
                        "or a .npy [C, H, W] preprocessed as the corpus")
    explain.add_argument("--corpus", metavar="CORPUS.npz", help="an image atlas's corpus (the same file it was built "
                         "from): its references' pixels")
    explain.add_argument("--top", type=int, default=3, help="units shown on each side (positive, negative)")
    explain.add_argument("--refs", type=int, default=3, help="references shown per unit")
    explain.add_argument("--tokenizer", metavar="DIR")
    add_preset_option(explain)
    explain.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    explain.add_argument("--html", metavar="PATH", help="write a self-contained HTML page")
    add_force_option(explain, "--html")


def run(args) -> int:
    from lrpc import atlas
    if args.action == "build":
        path = atlas.build(args.model, args.corpus, args.out, components=args.components, k=args.k,
                           batch_size=args.batch, preset=args.preset, tokenizer=args.tokenizer, force=args.force,
                           progress=not args.quiet)
        print(f"wrote {path}")
        return 0
    from lrpc import safeio
    inputs = safeio.input_files(*(f for f in (args.model, args.atlas, args.corpus, args.image) if f))
    if args.html:
        safeio.check_output(args.html, force=args.force, inputs=inputs)
    book = atlas.Atlas(args.atlas, model=args.model)
    result = atlas.explain(args.model, args.text, book, image=args.image, corpus=args.corpus, top=args.top,
                           refs=args.refs, tokenizer=args.tokenizer, preset=args.preset,
                           pictures=bool(args.html and args.image))
    images = _images(result) if args.html and args.image else ()
    if args.json:
        from lrpc.results import json_text
        print(json_text(result))
    else:
        _terminal(result)
    if args.html:
        from lrpc import viz
        page = viz.html_report(_rows(result), f"concepts: {_sample(result)}", summary=_summary(result), images=images)
        safeio.write_text(args.html, page, force=args.force, inputs=inputs)
    return 0


def _caption(u: dict, i: int, ref: dict) -> str:
    return (f"{u['component']} unit {u['unit']} (R = {u['relevance']:+.4g}) · reference {i + 1}: {ref['text']} "
            f"(RelMax {ref['score']:.4g}, position {ref['position']})")


def _images(result: dict) -> list[tuple]:
    """(caption, PNG, Σ, None) per reference of an image atlas: the corpus image with its conditional heatmap
    overlaid. Takes the pictures out of the result (they are for the page, not the JSON)."""
    import numpy as np

    from lrpc import viz
    def enlarged(picture):   # small images (32×32) drawn at ≥ 256 pixels, each pixel a block
        k = max(1, 256 // max(picture.shape[:2]))
        return picture.repeat(k, 0).repeat(k, 1)

    return [(_caption(u, i, ref), viz.image_overlay_png(np.array(ref["heatmap"]), enlarged(ref.pop("picture"))),
             float(np.sum(ref["heatmap"])), None)
            for u in result["units"] for i, ref in enumerate(u["references"])]


def _rows(result: dict):
    """One heatmap row per reference of a text atlas, titled with its unit: the reference's conditional heatmap."""
    import numpy as np

    from lrpc.viz import TokenRow
    return [TokenRow(title=_caption(u, i, ref), tokens=ref["tokens"], relevance=np.array(ref["heatmap"]),
                     explained="conditional heatmap: relevance through this unit alone")
            for u in result["units"] for i, ref in enumerate(u["references"]) if "tokens" in ref]


def _sample(result: dict) -> str:
    return result["text"] if "text" in result else result["image"]


def _summary(result: dict) -> str:
    return "; ".join(f"{u['component']}#{u['unit']} {u['relevance']:+.4g}" for u in result["units"])


def _terminal(result: dict) -> None:
    import numpy as np

    from lrpc import viz
    print(f"units most relevant for the prediction on {_sample(result)!r}: {_summary(result)}")
    viz.terminal(_rows(result))
    for u in result["units"]:
        for i, ref in enumerate(u["references"]):
            if "tokens" not in ref:   # an image reference: its conditional heatmap in blocks, and its sum
                heat = np.array(ref["heatmap"])
                row, column = np.unravel_index(np.abs(heat).argmax(), heat.shape)
                viz.terminal_image(heat, f"{_caption(u, i, ref)} · peak {heat[row, column]:+.4g} at pixel "
                                         f"(row {row}, column {column})", float(heat.sum()), None)
