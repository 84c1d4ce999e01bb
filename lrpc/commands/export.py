"""lrpc export: a Hugging Face folder or a zoo model to ONNX."""

from __future__ import annotations

from lrpc.commands.common import add_force_option

HELP = "export a model to ONNX"
EXAMPLES = """examples:
  lrpc export hf bert -o bert.onnx                          # a zoo model
  lrpc export hf ./my-model --task sequence-classification -o model.onnx
"""


def add_arguments(p) -> None:
    p.add_argument("kind", choices=["hf"], help="hf: a local Hugging Face folder or a zoo name")
    p.add_argument("model")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--task")
    p.add_argument("--opset", type=int)
    add_force_option(p, "-o (and its .data file)")


def run(args) -> int:
    from lrpc import safeio
    from lrpc.frontend import export_hf
    from lrpc.loading import check_writable
    inputs = safeio.input_files(args.model)
    check_writable(args.out, args.force, inputs)
    export_hf(args.model, task=args.task, output=args.out, opset=args.opset, force=args.force, inputs=inputs)
    print(f"wrote {args.out}")
    return 0
