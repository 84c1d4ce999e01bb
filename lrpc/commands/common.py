"""Options and helpers several commands share: one definition, one meaning."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_preset_option(p: argparse.ArgumentParser) -> None:
    from lrpc.presets import PRESETS
    p.add_argument("--preset", default="attnlrp", choices=list(PRESETS),
                   help=f"rule set: {', '.join(PRESETS)} (default attnlrp; gxi: plain Input×Gradient)")


def add_rule_options(p: argparse.ArgumentParser) -> None:
    """The rule options of compile, plan and diff: preset, attributed inputs, ε / γ and where they apply."""
    add_preset_option(p)
    p.add_argument("--attribute", nargs="+", metavar="NAME", help="inputs to attribute (default: float inputs "
                   "and token ids feeding an embedding)")
    p.add_argument("--epsilon", type=float, metavar="E", help="explicit ε-rule on linear layers")
    p.add_argument("--gamma-linear", type=float, metavar="G", help="γ-rule on MatMul/Gemm layers")
    p.add_argument("--gamma-conv", type=float, metavar="G", help="γ-rule on Conv layers")
    p.add_argument("--rule-nodes", metavar="REGEX", help="apply --epsilon/--gamma-* only to nodes whose name matches")
    p.add_argument("--layers", metavar="REGEX", help=argparse.SUPPRESS)   # the old name of --rule-nodes: refused
    p.add_argument("--components", metavar="mlp,heads,residual", help="model components found in the graph: "
                   "compile adds relevance.<component>.<layer> (one value per unit); plan and diff list them")


def rule_options(args):
    """The `lrpc.presets.Options` the rule options on the command line ask for."""
    from lrpc.errors import LrpcError
    from lrpc.presets import Options
    if args.layers is not None:   # one meaning per flag: --layers is per-layer relevance (lrpc explain)
        raise LrpcError(f"--layers REGEX is now --rule-nodes REGEX here (the nodes --epsilon / --gamma-* apply to); "
                        f"--layers means per-layer relevance in `lrpc explain`: give --rule-nodes {args.layers!r}")
    return Options(epsilon=args.epsilon, gamma_linear=args.gamma_linear, gamma_conv=args.gamma_conv,
                   rule_nodes=args.rule_nodes)


def check_counts(args, *flags: str) -> None:
    """Each of these count options, when given, is a whole number ≥ 1 (lrpc.validate.at_least_one)."""
    from lrpc import validate
    for flag in flags:
        if getattr(args, flag) is not None:
            validate.at_least_one(getattr(args, flag), "--" + flag.replace("_", "-"))


def add_force_option(p: argparse.ArgumentParser, what: str = "the output files") -> None:
    p.add_argument("--force", action="store_true", help=f"overwrite {what} if they exist (never the inputs)")


def model_source(source: str, args):
    """An ONNX path, or a Hugging Face folder / zoo name exported on the way."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        from lrpc.frontend import export_hf
        return export_hf(path, task=getattr(args, "task", None),
                         allow_random_head=getattr(args, "allow_random_head", False))
    return source


def load_plan(source: str, args) -> dict:
    """A saved plan (.json written by `lrpc plan --format json`) or the plan of a model."""
    from lrpc import planio
    from lrpc.compiler import plan_document
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        doc = planio.read_plan_json(path)
        if doc is not None:
            return doc
    options = rule_options(args)  # refused before a model is exported on the way
    return plan_document(model_source(source, args), args.preset, args.attribute, options,
                         source=source, components=args.components)
