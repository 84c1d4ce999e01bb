"""lrpc evaluate: faithfulness of AttnLRP and baselines by input perturbation (lrpc/evaluate.py)."""

from __future__ import annotations

HELP = ("faithfulness: MoRF/LeRF perturbation curves, ABPC and AOPC of AttnLRP and baselines (gxi, Integrated "
        "Gradients, cp-lrp, attention rollout, random)")
EXAMPLES = """examples:
  lrpc evaluate minilm-sentence --pairs pairs.tsv --plot curves.png --json metrics.json
  lrpc evaluate model.onnx --inputs examples.npz --methods attnlrp gxi random
  lrpc evaluate model.onnx --inputs examples.npz --top-k 3     (3 targets per input, one explainer run each)
"""


def add_arguments(p) -> None:
    from lrpc.evaluate import METHODS, REPLACE
    p.add_argument("model", help="the original ONNX model (not an explainer), or the zoo name minilm-sentence")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="TSV of sentence pairs: explain cos(e_A, e_B) over sentence A's tokens "
                     "(sentence encoders; --seed vector is implied)")
    src.add_argument("--inputs", help=".npz with one array per model input (first axis: examples) and optionally "
                     "lrp_target [examples] or [examples, K] (K targets per input); default target: the predicted "
                     "class")
    p.add_argument("--top-k", type=int, help="--inputs: explain each input's K highest-scoring classes, each with "
                   "its own curves (one run of the many-targets explainer per input and method)")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder) for --pairs (default: the shipped MiniLM's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--replace", default="zero", choices=list(REPLACE), help="what a removed token becomes: zero "
                   "embedding (the paper's setting) or the embedding of the mask / pad token")
    p.add_argument("--replace-id", type=int, help="id of the mask / pad token (default for --pairs: BERT's 103 / 0)")
    p.add_argument("--patch", type=int, default=1, help="float (image) inputs: remove patches of PxP pixels")
    p.add_argument("--steps", type=int, default=10, help="points on each curve beyond the first (default 10)")
    p.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps (default 16)")
    p.add_argument("--rollout-query", default="mean", choices=["mean", "first"],
                   help="attention rollout row: mean over tokens (mean pooling) or the first (class) token")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--plot", help="write the curves to this PNG")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", help="machine-readable output: the metrics as "
                   "JSON on stdout (the table goes to stderr), or written to FILE")
    p.add_argument("--force", action="store_true", help="overwrite --plot / --json files if they exist (never the "
                   "inputs)")
    p.add_argument("--threads", type=int, help="onnxruntime threads")


def run(args) -> int:
    from pathlib import Path

    from lrpc import safeio
    from lrpc.commands.common import check_counts
    from lrpc.errors import LrpcError, require
    check_counts(args, "steps", "ig_steps", "patch", "limit", "top_k")
    if args.top_k is not None and args.pairs:
        raise LrpcError("--top-k needs --inputs (a sentence pair has one explained similarity)")
    if args.plot:
        require("matplotlib", purpose="--plot")
    sources = safeio.input_files(args.model, args.pairs, args.inputs, args.tokenizer)
    for path in filter(None, [args.plot, None if args.json == "-" else args.json]):
        safeio.check_output(path, force=args.force, inputs=sources)
    if args.model == "minilm-sentence" and not Path(args.model).exists():
        from lrpc import models
        with safeio.scratch_folder("lrpc-eval-") as workdir:  # the exported model, removed on every exit
            model = workdir / "minilm-sentence.onnx"
            models.get("minilm-sentence").export(model)
            return _evaluate(args, model, "all-MiniLM-L6-v2", sources)
    if not Path(args.model).is_file():
        raise LrpcError(f"{args.model} does not exist: give an ONNX model")
    return _evaluate(args, args.model, Path(args.model).stem, sources)


def _evaluate(args, model, name: str, sources) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from lrpc import contract, safeio, validate
    from lrpc.errors import LrpcError
    from lrpc.evaluate import Evaluator, Example, evaluate, load_tokenizer, read_pairs, similarity_examples
    from lrpc.inputs import read_npz
    from lrpc.runtime import checked_feed
    replace_id = args.replace_id
    if args.pairs and replace_id is None and args.replace != "zero":
        replace_id = {"mask": 103, "pad": 0}[args.replace]
    evaluator = Evaluator(model, seed="vector" if args.pairs else "target", replace=args.replace,
                          replace_id=replace_id, patch=args.patch, rollout_query=args.rollout_query,
                          ig_steps=args.ig_steps, threads=args.threads)
    if args.pairs:
        if evaluator.ids is None:
            raise LrpcError("--pairs needs a token model (ids feeding an embedding table)")
        pairs = read_pairs(args.pairs)[:args.limit]
        examples = similarity_examples(evaluator, pairs, load_tokenizer(args.tokenizer))
    else:
        data = read_npz(Path(args.inputs))
        specs = {i.name: i for i in evaluator.forward_session.get_inputs() if i.name != evaluator.embeds}
        arrays = checked_feed(specs, {n: a for n, a in data.items() if n != contract.TARGET})
        count = len(next(iter(arrays.values())))
        targets = data.get(contract.TARGET)
        if targets is not None and args.top_k is not None:
            raise LrpcError(f"--top-k and the {contract.TARGET} of {args.inputs} both choose targets: give one")
        if targets is not None:
            targets = (validate.index_matrix(contract.TARGET, targets, count, None, None) if np.ndim(targets) == 2
                       else validate.indices(contract.TARGET, targets, count, None))
        examples = []
        for i in range(count if args.limit is None else min(count, args.limit)):
            ex = Example({n: a[i:i + 1] for n, a in arrays.items()})
            if targets is not None:
                ex.target = targets[i].tolist()
            elif args.top_k is not None:   # the k highest classes, best first (a stable order for ties)
                ex.target = np.argsort(-evaluator.predict(ex), kind="stable")[:args.top_k].tolist()
            else:
                ex.target = int(evaluator.predict(ex).argmax())
            examples.append(ex)
    import sys
    results = evaluate(evaluator, examples, args.methods, args.steps, name=name)
    report = sys.stderr if args.json == "-" else sys.stdout   # stdout holds only the JSON then
    print(f"{name}: {results.n} examples, {results.seconds:.1f} s", file=report)
    print(results.markdown(), file=report)
    if args.plot:
        results.plot(args.plot, "cosine similarity" if args.pairs else "target logit", force=args.force,
                     inputs=sources)
        print(f"wrote {args.plot}", file=report)
    if args.json == "-":
        print(json.dumps(results.summary(), indent=1))
    elif args.json:
        safeio.write_text(args.json, json.dumps(results.summary(), indent=1) + "\n", force=args.force,
                          inputs=sources)
        print(f"wrote {args.json}")
    return 0
