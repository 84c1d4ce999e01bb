"""lrpc explain: explain inputs with a terminal heatmap, an HTML report, PNGs or JSON."""

from __future__ import annotations

from lrpc.commands.common import add_force_option, add_preset_option, check_counts

HELP = "explain inputs: terminal heatmap, HTML report, PNG, JSON (compiles and caches the explainer on the way)"
EXAMPLES = """examples:
  lrpc explain llama --text "the cat sat on the"                  # next token (zoo models: toy word tokenizer)
  lrpc explain bert --text "a great movie" --top-k 3 --html r.html
  lrpc explain llama --text "the cat sat on the" --target mat --contrast dog
  lrpc explain model.onnx --tokenizer DIR --text "…" --target mat
  lrpc explain llama --text "the cat sat on the" --layers --png layers.png
  lrpc explain hf-vit --image cat.png --png cat-lrp.png
  lrpc explain model.onnx --input inputs.npz --json
  lrpc explain bert --file inputs.jsonl --json > results.jsonl    # one {"text": …} per line
  lrpc explain llama --text "the cat sat on the" --generate 8 --html gen.html   # attribute a generated answer
"""


def add_arguments(p) -> None:
    p.add_argument("model", help="an explainer, an ONNX model, a Hugging Face folder or a zoo name (models are "
                   "compiled on the way with a vector seed and cached under $LRPC_CACHE or ~/.cache/lrpc)")
    source = p.add_argument_group("inputs (one of)")
    source.add_argument("--text", action="append", metavar="TEXT", help="text to explain (repeat for a padded batch)")
    source.add_argument("--image", action="append", metavar="FILE", help="an image for a vision model (resized to "
                        "the model's input size, ImageNet mean/std unless the folder's preprocessor_config.json "
                        "says otherwise)")
    source.add_argument("--input", metavar="FILE.npz", help="arrays named like the model's inputs (with a batch axis)")
    source.add_argument("--file", metavar="FILE.jsonl", help='many inputs, one JSON object a line: {"text": …} or '
                        '{"image": PATH} or {"npz": PATH}, optionally with "target", "contrast", "position", "top_k"')
    t = p.add_argument_group("target (default: the predicted class / next token)")
    t.add_argument("--target", metavar="T", help="a class index, a label, or a token string")
    t.add_argument("--top-k", type=int, metavar="K", help="explain the K highest-scoring classes (one batch)")
    t.add_argument("--position", type=int, metavar="P", help="sequence position to explain (negative: from the end;"
                   " default: the last token)")
    t.add_argument("--contrast", metavar="B", help="explain logit[target] − logit[B]")
    t.add_argument("--generate", type=int, metavar="N", help="causal LMs: greedily generate up to N tokens after "
                   "--text (stopping at the model's end-of-sequence token) and explain each of them in one run: "
                   "the [generated × prompt+generated] relevance matrix")
    p.add_argument("--tokenizer", metavar="DIR", help="folder with tokenizer.json (default: the model's folder; "
                   "'toy': the 128-word tokenizer of the tiny zoo models, their default)")
    p.add_argument("--task", help="task for a Hugging Face folder")
    add_preset_option(p)
    p.add_argument("--layers", action="store_true", help="relevance per token per layer (the residual stream)")
    p.add_argument("--latent", metavar="REGEX", help="per-layer relevance of these tensors instead (`lrpc plan "
                   "--tensors` lists them)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="machine-readable output on stdout (JSON lines with --file)")
    out.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    out.add_argument("--png", metavar="PATH", help="write a PNG: the heatmap over the image (vision), the per-layer "
                     "picture (--layers), else a token heatmap; several results get PATH-<n>.png")
    add_force_option(out, "--html / --png / --out files")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--cache", metavar="DIR", help="folder for compiled explainers")
    from lrpc import corpus_run   # --out, --resume, --engine, …: corpus-scale runs
    corpus_run.add_arguments(p)


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from lrpc import safeio
    from lrpc.attributor import Attributor
    from lrpc.errors import LrpcError, require
    from lrpc.inputs import read_jsonl, read_npz
    from lrpc.results import Attributions, json_text
    given = [x for x in (args.text, args.image, args.input, args.file) if x]
    if len(given) != 1:
        raise LrpcError("give exactly one of --text, --image, --input, --file")
    if args.top_k is not None and args.target is not None:
        raise LrpcError("--top-k explains the K best classes: drop --target, or drop --top-k")
    check_counts(args, "top_k", "batch_size", "generate")
    from lrpc import corpus_run
    if args.generate is not None:
        if corpus_run.wanted(args):
            raise LrpcError("--generate explains one prompt, not a corpus: drop the corpus options (--out, …)")
        clashing = [flag for flag, value in (("--target", args.target), ("--top-k", args.top_k),
                                             ("--position", args.position), ("--contrast", args.contrast),
                                             ("--layers", args.layers), ("--latent", args.latent)) if value]
        if clashing or not args.text or len(args.text) != 1:
            raise LrpcError("--generate explains the tokens the model generates after one --text prompt: "
                            + (f"drop {', '.join(clashing)}" if clashing else "give exactly one --text"))
    if corpus_run.wanted(args):
        return corpus_run.run_cli(args)
    if args.png:
        require("matplotlib", purpose="--png")
    sources = safeio.input_files(args.model, args.tokenizer, args.input, args.file, *(args.image or []))
    for path in filter(None, [args.html, args.png]):
        safeio.check_output(path, force=args.force, inputs=sources)
    attributor = Attributor(args.model, tokenizer=args.tokenizer, preset=args.preset, layers=args.layers,
                            latent=args.latent, task=args.task, cache=args.cache)
    if args.generate is not None:
        return _generation(attributor.generate(args.text[0], args.generate), args, sources)
    spec = {"target": args.target, "contrast": args.contrast, "position": args.position, "top_k": args.top_k}
    if args.file:
        groups = read_jsonl(Path(args.file), spec)
        results = Attributions()
        total = sum(len(g[1]) for g in groups)
        from rich.console import Console
        from rich.progress import Progress
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("explaining", total=total)
            for line_spec, inputs in groups:
                for a in _as_list(attributor.attribute(inputs, batch_size=args.batch_size,
                                                       progress=lambda k: bar.advance(task, k), **line_spec)):
                    results.append(a)
    else:
        if args.text:
            inputs, image = args.text, None
        elif args.image:
            inputs, image = None, args.image
        else:
            inputs, image = read_npz(Path(args.input)), None
        results = Attributions(_as_list(attributor.attribute(inputs, image=image, batch_size=args.batch_size,
                                                             **spec)))
    if args.json:
        docs = results.to_dicts()
        if args.file:
            for doc in docs:
                print(json_text(doc))
        else:
            print(json_text(docs[0] if len(docs) == 1 else docs))
    else:
        results.show()
    if args.html:
        results.to_html(args.html, force=args.force, inputs=sources)
        print(f"HTML report: {args.html}", file=sys.stderr if args.json else sys.stdout)
    if args.png:
        written = []
        for i, a in enumerate(results):
            path = Path(args.png) if len(results) == 1 else Path(args.png).with_name(
                f"{Path(args.png).stem}-{i}{Path(args.png).suffix or '.png'}")
            written.append(str(a.save_png(path, force=args.force, inputs=sources)))
        print(f"PNG: {', '.join(written)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _generation(generation, args, sources) -> int:
    """Show / write a `Generation` (`--generate`): terminal or --json, then --html / --png."""
    import sys
    print(generation.to_json()) if args.json else generation.show()
    where = sys.stderr if args.json else sys.stdout
    if args.html:
        generation.to_html(args.html, force=args.force, inputs=sources)
        print(f"HTML report: {args.html}", file=where)
    if args.png:
        print(f"PNG: {generation.save_png(args.png, force=args.force, inputs=sources)}", file=where)
    return 0


def _as_list(result) -> list:
    from lrpc.results import Attributions
    return list(result) if isinstance(result, Attributions) else [result]
