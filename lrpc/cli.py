"""The `lrpc` command line. Every user error is one line on stderr and exit code 2; no partial files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLES = """examples:
  lrpc compile model.onnx -o explainer.onnx                 # AttnLRP explainer of the first output
  lrpc compile model.onnx -o gxi.onnx --preset gxi          # plain Input×Gradient
  lrpc compile model.onnx -o e.onnx --output logits --attribute input_ids
  lrpc plan model.onnx                                      # which rule each node gets
  lrpc plan model.onnx --format json > plan.json && lrpc diff plan.json new_model.onnx
  lrpc ops                                                  # ops with a relevance rule
  lrpc demo                                                 # explain sentence similarity with MiniLM
"""


EXPLAIN_EXAMPLES_HINT = """examples:
  lrpc explain llama --text "the cat sat on the"            # the predicted next token
  lrpc explain bert --text "a great movie" --top-k 3 --html report.html
  lrpc explain llama --text "the cat sat on the" --target mat --contrast dog
  lrpc explain llama --text "the cat sat on the" --layers --png layers.png
  lrpc explain hf-vit --image cat.png --png cat-lrp.png
  lrpc explain model.onnx --file inputs.jsonl --json        # one {"text": ...} per line
"""


def _add_rule_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="attnlrp", choices=["attnlrp", "cp-lrp", "gxi"],
                   help="rule set: attnlrp (default), cp-lrp, or gxi (plain Input×Gradient)")
    p.add_argument("--attribute", nargs="+", metavar="NAME", help="inputs to attribute (default: float inputs "
                   "and token ids feeding an embedding)")
    p.add_argument("--epsilon", type=float, metavar="E", help="explicit ε-rule on linear layers")
    p.add_argument("--gamma-linear", type=float, metavar="G", help="γ-rule on MatMul/Gemm layers")
    p.add_argument("--gamma-conv", type=float, metavar="G", help="γ-rule on Conv layers")
    p.add_argument("--layers", metavar="REGEX", help="apply --epsilon/--gamma-* only to nodes whose name matches")


def build_parser() -> argparse.ArgumentParser:
    from lrpc import __version__
    parser = argparse.ArgumentParser(prog="lrpc", description="Compile transformers into ONNX explainers that "
                                     "compute AttnLRP relevance in one onnxruntime run.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lrpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="turn a model into an explainer", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX file (with its .data file beside it) or a local Hugging Face model folder")
    p.add_argument("-o", "--out", required=True, help="where to write the explainer (.onnx)")
    _add_rule_options(p)
    p.add_argument("--output", metavar="NAME", help="model output to explain (default: the first)")
    p.add_argument("--seed", default="target", choices=["target", "vector"],
                   help="target: explain y[target] (input lrp_target); vector: explain Σ seed·y (input lrp_seed)")
    p.add_argument("--latent", metavar="REGEX", help="also output relevance.<tensor> for matching tensors")
    p.add_argument("--embeddings-input", action="store_true", help="take the embedding lookup's output as an "
                   "extra float input inputs_embeds.<ids> instead of looking it up (for perturbation / path "
                   "methods); relevance is still relevance.<ids>")
    p.add_argument("--task", help="task for a Hugging Face folder (causal-lm, sequence-classification, "
                   "feature-extraction, sentence-similarity, image-classification)")
    p.add_argument("--force", action="store_true", help="overwrite -o if it exists")
    p.add_argument("--checkpoint", metavar="auto|N", help="rematerialise forward segments of N layers (auto: √L) "
                   "during the relevance pass: memory grows like √layers for one extra forward")
    p.add_argument("--reuse-weights", action="store_true", help="reference the model's external-data weights "
                   "file from the explainer instead of copying it (-o must be in that file's folder or above)")

    p = sub.add_parser("plan", help="print the rule assignment of a model")
    p.add_argument("model")
    p.add_argument("--tensors", action="store_true", help="list the relevance-carrying tensors (names for --latent)")
    _add_rule_options(p)
    p.add_argument("--format", default="text", choices=["text", "json"])
    p.add_argument("-o", "--out", help="write the plan to a file instead of stdout")
    p.add_argument("--force", action="store_true", help="overwrite -o if it exists")

    p = sub.add_parser("diff", help="compare the rule assignments of two models or saved plans (exit 1 if "
                       "they differ)")
    p.add_argument("a")
    p.add_argument("b")
    _add_rule_options(p)

    sub.add_parser("ops", help="list the ops that have a relevance rule")
    p = sub.add_parser("zoo", help="list the model zoo")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export a model to ONNX")
    p.add_argument("kind", choices=["hf"], help="hf: a local Hugging Face folder or a zoo name")
    p.add_argument("model")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--task")
    p.add_argument("--opset", type=int)
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("demo", help="the main job: why are two sentences similar? (shipped MiniLM)")
    p.add_argument("sentence_a", nargs="?")
    p.add_argument("sentence_b", nargs="?")
    p.add_argument("--html", default="lrpc-demo.html", help="where to write the HTML report")
    p.add_argument("--cache", default=None, help="folder for the compiled explainer (default ~/.cache/lrpc)")

    p = sub.add_parser("evaluate", help="faithfulness: MoRF/LeRF perturbation curves, ABPC and AOPC of AttnLRP "
                       "and baselines (gxi, Integrated Gradients, cp-lrp, attention rollout, random)")
    from lrpc.evaluate import add_arguments
    add_arguments(p)
    p = sub.add_parser("explain", help="explain inputs: terminal heatmap, HTML report, PNG, JSON (compiles and "
                       "caches the explainer on the way)", epilog=EXPLAIN_EXAMPLES_HINT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from lrpc.explain import add_arguments as add_explain_arguments
    add_explain_arguments(p)
    _add_bench_parser(sub)
    return parser


def _options(args):
    from lrpc.presets import Options
    return Options(epsilon=args.epsilon, gamma_linear=args.gamma_linear, gamma_conv=args.gamma_conv,
                   layers=args.layers)


def _load_plan(source: str, args) -> dict:
    from lrpc import planio
    from lrpc.compiler import plan_document
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        doc = planio.read_plan_json(path)
        if doc is not None:
            return doc
    return plan_document(_model_source(source, args), args.preset, args.attribute, _options(args), source=source)


def _model_source(source: str, args):
    """An ONNX path, or a Hugging Face folder / zoo name exported on the way."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        from lrpc.frontend import export_hf
        return export_hf(path, task=getattr(args, "task", None))
    return source


def cmd_compile(args) -> int:
    import lrpc
    from lrpc.loading import check_writable
    check_writable(args.out, args.force)
    model = _model_source(args.model, args)
    lrpc.compile(model, preset=args.preset, output=args.out, output_name=args.output, attribute=args.attribute,
                 seed=args.seed, latent=args.latent, force=args.force, epsilon=args.epsilon,
                 gamma_linear=args.gamma_linear, gamma_conv=args.gamma_conv, layers=args.layers,
                 embeddings_input=args.embeddings_input, reuse_weights=args.reuse_weights,
                 checkpoint=args.checkpoint)
    print(f"wrote {args.out} (preset {args.preset})")
    return 0


def cmd_plan(args) -> int:
    if getattr(args, "tensors", False):
        return cmd_plan_tensors(args)
    from lrpc import planio
    doc = _load_plan(args.model, args)
    text = json.dumps(doc, indent=1) if args.format == "json" else planio.to_text(doc)
    if args.out:
        from lrpc.loading import check_writable
        out = check_writable(args.out, args.force)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out)
    else:
        print(text)
    return 0


def cmd_diff(args) -> int:
    from lrpc import planio
    a, b = _load_plan(args.a, args), _load_plan(args.b, args)
    lines = planio.diff(a, b, args.a, args.b)
    if not lines:
        print(f"plans agree: {sum(a['summary'].values())} rule-bearing nodes, {a['summary']}")
        return 0
    print("\n".join(lines))
    return 1


def cmd_ops(args) -> int:
    from lrpc import ops, rules
    print("ops with an exact local rule (the ε-rule with ε → 0 / Input×Gradient), under every preset:")
    print("  " + ", ".join(ops.with_vjp()))
    print("fused ops, rewritten into the ops above before analysis:")
    print("  " + ", ".join(ops.of_kind(ops.FUSED)))
    print("fused ops recognised and refused (the compile error says why):")
    print("  " + ", ".join(ops.of_kind(ops.REFUSED)))
    print("ops with zero derivative (their outputs never carry relevance):")
    print("  " + ", ".join(ops.of_kind(ops.NON_DIFFERENTIABLE)))
    print("AttnLRP rules the passes assign to single nodes:")
    print("  " + ", ".join(sorted(rules.RULES)))
    return 0


def cmd_zoo(args) -> int:
    from lrpc import models
    rows = [{"name": e.name, "family": e.family, "task": e.task, "exporters": list(e.exporters)}
            for e in (models.get(n) for n in models.names())]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<20} {r['family']:<18} {r['task']:<22} {', '.join(r['exporters'])}")
    return 0


def cmd_export(args) -> int:
    from lrpc.frontend import export_hf
    from lrpc.loading import check_writable
    check_writable(args.out, args.force)
    export_hf(args.model, task=args.task, output=args.out, opset=args.opset, force=args.force)
    print(f"wrote {args.out}")
    return 0


def cmd_explain(args) -> int:
    from lrpc.explain import run_cli
    return run_cli(args)


def cmd_plan_tensors(args) -> int:
    from lrpc.explain import carrying_tensors
    for name, op, shape in carrying_tensors(_model_source(args.model, args)):
        print(f"{name:<32} {op:<20} {shape}")
    return 0


def cmd_demo(args) -> int:
    from lrpc.demo import run_demo
    return run_demo(args.sentence_a, args.sentence_b, html=args.html, cache=args.cache)


def cmd_evaluate(args) -> int:
    from lrpc.evaluate import run_cli
    return run_cli(args)


COMMANDS = {"evaluate": cmd_evaluate, "compile": cmd_compile, "plan": cmd_plan, "diff": cmd_diff, "ops": cmd_ops, "zoo": cmd_zoo,
            "export": cmd_export, "demo": cmd_demo}

COMMANDS["explain"] = cmd_explain


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time and peak memory: onnxruntime forward vs explainer vs torch autograd "
                       "Input×Gradient vs token occlusion, side by side")
    p.add_argument("model", help="ONNX file or zoo name (llama-bench: the issue-6 workload)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layers", type=int, help="llama-bench only: number of layers (default 8)")
    p.add_argument("--checkpoint", metavar="auto|N", help="compile the explainer with --checkpoint")
    p.add_argument("--occlusion", default="sample", choices=["sample", "full", "off"],
                   help="sample: time 2 batches of occluded sequences and extrapolate; full: all of them")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--workdir", help="keep the exported model and explainer here")
    p.add_argument("--json", action="store_true")


def cmd_bench(args) -> int:
    from lrpc.bench import bench, format_result
    result = bench(args.model, seq=args.seq, batch=args.batch, threads=args.threads, repeats=args.repeats,
                   occlusion=args.occlusion, memory=not args.no_memory, checkpoint=args.checkpoint,
                   workdir=args.workdir, layers=args.layers)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


COMMANDS["bench"] = cmd_bench


def _printable(message: str) -> str:
    """One line, whatever the stream's encoding: undecodable path bytes (surrogates) shown as \\xNN escapes."""
    message = " ".join(message.splitlines())
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return message.encode(encoding, "backslashreplace").decode(encoding, "replace")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from lrpc.errors import LrpcError
    try:
        return COMMANDS[args.command](args)
    except LrpcError as exc:
        print(_printable(f"lrpc: error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrpc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the user; LRPC_DEBUG=1 shows it
        if os.environ.get("LRPC_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(_printable(f"lrpc: error: {type(exc).__name__}: {first} (unexpected; rerun with LRPC_DEBUG=1 for "
                         "details)"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
