"""lrpc plan: print (or save) the rule assignment of a model."""

from __future__ import annotations

from lrpc.commands.common import add_force_option, add_rule_options, load_plan, model_source

HELP = "print the rule assignment of a model"
EXAMPLES = """examples:
  lrpc plan model.onnx                                      # which rule each node gets
  lrpc plan model.onnx --tensors                            # tensor names for --latent
  lrpc plan model.onnx --components mlp,heads,residual      # what each component selector resolves to
  lrpc plan model.onnx --format json -o plan.json && lrpc diff plan.json new_model.onnx
"""


def add_arguments(p) -> None:
    p.add_argument("model")
    p.add_argument("--tensors", action="store_true", help="list the relevance-carrying tensors (names for --latent)")
    add_rule_options(p)
    p.add_argument("--format", default="text", choices=["text", "json"])
    p.add_argument("-o", "--out", help="write the plan to a file instead of stdout")
    add_force_option(p, "-o")


def run(args) -> int:
    if args.tensors:
        from lrpc.latent import carrying_tensors
        for name, op, shape in carrying_tensors(model_source(args.model, args)):
            print(f"{name:<32} {op:<20} {shape}")
        return 0
    import json

    from lrpc import planio, safeio
    sources = safeio.input_files(args.model)
    if args.out:  # refused before the work, not after it
        safeio.check_output(args.out, force=args.force, inputs=sources)
    doc = load_plan(args.model, args)
    text = json.dumps(doc, indent=1) if args.format == "json" else planio.to_text(doc)
    if args.out:
        safeio.write_text(args.out, text + "\n", force=args.force, inputs=sources)
    else:
        print(text)
    return 0
