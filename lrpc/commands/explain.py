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
  lrpc explain clip --image cat.png --text "a cat" --html r.html  # image–text similarity, both towers
  lrpc explain ENCODER_DIR --text "a man plays guitar" --similar-to "someone makes music"
  lrpc explain model.onnx --input inputs.npz --json
  lrpc explain bert --file inputs.jsonl --json > results.jsonl    # one {"text": …} per line
  lrpc explain llama --text "the cat sat on the" --generate 8 --html gen.html   # attribute a generated answer
  lrpc explain llama --text "the cat sat on the" --conditions mlp.1=17   # relevance through MLP unit 17 alone
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
    sim = p.add_argument_group("similarity (the cosine similarity of two embeddings, explained over each input)")
    sim.add_argument("--similar-to", metavar="B", help="explain why --text (or --image) is similar to B (a text, "
                     "or an image file) for an encoder: pooled, L2-normalised embeddings")
    sim.add_argument("--pooling", choices=("mean", "cls", "pooler"), help="how --similar-to pools the encoder's "
                     "hidden states (default: the folder's sentence-transformers pooling, else mean)")
    sim.add_argument("--towers", choices=("both", "image", "text"), default="both",
                     help="--image with --text on a dual encoder (CLIP): explain their similarity over the "
                     "image, the text, or both (default)")
    t = p.add_argument_group("target (default: the predicted class / next token)")
    t.add_argument("--target", metavar="T", help="a class index, a label, or a token string")
    t.add_argument("--top-k", type=int, metavar="K", help="explain the K highest-scoring classes (one batch)")
    t.add_argument("--position", type=int, metavar="P", help="sequence position to explain (negative: from the end;"
                   " default: the last token)")
    t.add_argument("--contrast", metavar="B", help="explain logit[target] − logit[B]")
    t.add_argument("--generate", type=int, metavar="N", help="causal LMs: greedily generate up to N tokens after "
                   "--text (stopping at the model's end-of-sequence token) and explain each of them in one run: "
                   "the [generated × prompt+generated] relevance matrix; encoder–decoder LMs (T5, BART): --text "
                   "is the source, the matrix [generated × source+decoder start+generated]")
    t.add_argument("--conditions", metavar="C.L=U[,…]", help="conditional relevance (CRP): only what flows "
                   "through unit U of component C (mlp, heads, residual) in layer L, e.g. mlp.1=17 (several: "
                   "through all of them); the relevance bypassing those layers is dropped")
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
    import sys
    from pathlib import Path

    from lrpc import safeio
    from lrpc.errors import LrpcError, require
    from lrpc.results import json_text
    given = [x for x in (args.text, args.image, args.input, args.file) if x]
    dual = bool(args.text and args.image)
    if len(given) != 1 and not (dual and len(given) == 2):
        raise LrpcError("give exactly one of --text, --image, --input, --file (or --image with --text: a dual "
                        "encoder's image–text similarity)")
    similarity = dual or args.similar_to is not None
    if args.pooling and args.similar_to is None:
        raise LrpcError("--pooling says how --similar-to pools an encoder: give --similar-to B, or drop --pooling")
    if args.top_k is not None and args.target is not None:
        raise LrpcError("--top-k explains the K best classes: drop --target, or drop --top-k")
    check_counts(args, "top_k", "batch_size", "generate")
    from lrpc import corpus_run, validate
    if args.conditions is not None:
        from lrpc.components import SELECTORS
        args.condition = validate.conditions_option(args.conditions, SELECTORS)
    else:
        args.condition = None
    if args.condition and (args.generate is not None or args.file or similarity or corpus_run.wanted(args)):
        raise LrpcError("--conditions explains --text, --image or --input inputs: drop --generate, --file, "
                        "--similar-to and the corpus options (--out, …)")
    if args.generate is not None:
        if corpus_run.wanted(args):
            raise LrpcError("--generate explains one prompt, not a corpus: drop the corpus options (--out, …)")
        clashing = [flag for flag, value in (("--target", args.target), ("--top-k", args.top_k),
                                             ("--position", args.position), ("--contrast", args.contrast),
                                             ("--layers", args.layers), ("--latent", args.latent),
                                             ("--image", args.image), ("--similar-to", args.similar_to)) if value]
        if clashing or not args.text or len(args.text) != 1:
            raise LrpcError("--generate explains the tokens the model generates after one --text prompt: "
                            + (f"drop {', '.join(clashing)}" if clashing else "give exactly one --text"))
        from lrpc import models
        if not Path(args.model).exists() and models.known(args.model) and \
                models.get(args.model).task not in ("causal-lm", "seq2seq-lm"):   # said before exporting it
            from lrpc.attributor import NOT_A_LANGUAGE_MODEL
            raise LrpcError(NOT_A_LANGUAGE_MODEL.format(what=f"{args.model} is a {models.get(args.model).task} model"))
    if corpus_run.wanted(args):
        return corpus_run.run_cli(args)
    if args.png:
        require("matplotlib", purpose="--png")
    similar_file = [args.similar_to] if args.similar_to and Path(args.similar_to).is_file() else []   # an image
    sources = safeio.input_files(args.model, args.tokenizer, args.input, args.file, *(args.image or []), *similar_file)
    for path in filter(None, [args.html, args.png]):
        safeio.check_output(path, force=args.force, inputs=sources)
    if args.generate is not None:
        return _generation(_attributor(args).generate(args.text[0], args.generate), args, sources)
    spec = {"target": args.target, "contrast": args.contrast, "position": args.position, "top_k": args.top_k}
    results = _similarity(args, spec) if similarity else _attribute(args, spec)
    if args.json:
        docs = results.to_dicts()
        if args.file:
            for doc in docs:
                print(json_text(doc))
        else:
            print(json_text(docs[0] if len(docs) == 1 else docs))
    else:
        results.show()
    for error in results.errors:
        print(f"lrpc: {error.message}", file=sys.stderr)
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
    if results.errors:   # every other line was explained and written: exit 1 tells scripts some were not
        print(f"lrpc: {len(results.errors)} line(s) of {args.file} could not be explained (exit code 1)",
              file=sys.stderr)
        return 1
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


def _attributor(args):
    from lrpc.attributor import Attributor
    kinds = sorted({name.split(".")[0] for name in args.condition or ()})   # the explainer's condition inputs
    return Attributor(args.model, tokenizer=args.tokenizer, preset=args.preset, layers=args.layers,
                      latent=args.latent, task=args.task, cache=args.cache, conditions=",".join(kinds) or None)


def _attribute(args, spec):
    """One model's inputs (--text, --image, --input or --file) for their targets."""
    from pathlib import Path

    from lrpc.inputs import read_npz
    from lrpc.results import Attributions
    attributor = _attributor(args)
    if args.file:
        from rich.console import Console
        from rich.progress import Progress
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("explaining", total=None)
            return attributor.attribute_file(args.file, batch_size=args.batch_size,
                                             progress=lambda k: bar.advance(task, k), **spec)
    if args.text:
        inputs, image = args.text, None
    elif args.image:
        inputs, image = None, args.image
    else:
        inputs, image = read_npz(Path(args.input)), None
    results = Attributions(_as_list(attributor.attribute(inputs, image=image, batch_size=args.batch_size,
                                                         condition=args.condition, **spec)))
    for a in results if args.condition else ():   # the heatmap says it is a conditional one
        a.target_label = f"{a.target_label}, through {args.conditions} alone"
    return results


def _similarity(args, spec):
    """--text/--image with --similar-to (any encoder), or --image with --text (a dual encoder): their
    similarity explained over each input (lrpc.Similarity)."""
    from lrpc.attributor import Similarity, dual_encoder
    from lrpc.errors import LrpcError
    used = [f"--{name.replace('_', '-')}" for name, value in spec.items() if value is not None]
    used += [flag for flag, value in (("--layers", args.layers), ("--latent", args.latent)) if value]
    if used:
        raise LrpcError(f"a similarity is the explained value: drop {', '.join(used)}")
    if args.similar_to is not None:
        if args.input or args.file or args.image and args.text:
            raise LrpcError("--similar-to compares one --text or one --image with B: drop the other inputs")
        first = args.text or args.image
        if len(first) != 1:
            raise LrpcError("give one --text (or --image) to compare with --similar-to")
        model = Similarity(args.model, pooling=args.pooling, tokenizer=args.tokenizer, task=args.task,
                           preset=args.preset, cache=args.cache)
        return model.attribute(first[0], args.similar_to)
    if len(args.image) != 1 or len(args.text) != 1:
        raise LrpcError("give one --image and one --text to compare")
    if args.pooling or args.task:
        raise LrpcError("a dual encoder pools in its own towers: drop --pooling / --task")
    towers = None if args.towers == "both" else (args.towers,)
    model = dual_encoder(args.model, tokenizer=args.tokenizer, preset=args.preset, cache=args.cache)
    return model.attribute(args.image[0], args.text[0], towers=towers)


def _as_list(result) -> list:
    from lrpc.results import Attributions
    return list(result) if isinstance(result, Attributions) else [result]
