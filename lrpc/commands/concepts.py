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
    explain.add_argument("--text", required=True)
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
    if args.html:
        safeio.check_output(args.html, force=args.force, inputs=safeio.input_files(args.model, args.atlas))
    book = atlas.Atlas(args.atlas, model=args.model)
    result = atlas.explain(args.model, args.text, book, top=args.top, refs=args.refs, tokenizer=args.tokenizer,
                           preset=args.preset)
    if args.json:
        from lrpc.results import json_text
        print(json_text(result))
    else:
        _terminal(result)
    if args.html:
        from lrpc import viz
        safeio.write_text(args.html, viz.html_report(_rows(result), f"concepts: {args.text}",
                                                     summary=_summary(result)),
                          force=args.force, inputs=safeio.input_files(args.model, args.atlas))
    return 0


def _rows(result: dict):
    """One heatmap row per reference, titled with its unit: the reference's conditional heatmap."""
    import numpy as np

    from lrpc.viz import TokenRow
    return [TokenRow(title=f"{u['component']} unit {u['unit']} (R = {u['relevance']:+.4g}) · reference {i + 1} "
                           f"(RelMax {ref['score']:.4g}, position {ref['position']})",
                     tokens=ref["tokens"], relevance=np.array(ref["heatmap"]),
                     explained="conditional heatmap: relevance through this unit alone")
            for u in result["units"] for i, ref in enumerate(u["references"])]


def _summary(result: dict) -> str:
    return "; ".join(f"{u['component']}#{u['unit']} {u['relevance']:+.4g}" for u in result["units"])


def _terminal(result: dict) -> None:
    from lrpc import viz
    print(f"units most relevant for the prediction on {result['text']!r}: {_summary(result)}")
    viz.terminal(_rows(result))
