"""lrpc bench: time and peak memory of the explainer against the forward, torch autograd and occlusion."""

from __future__ import annotations

import argparse

HELP = ("time and peak memory: onnxruntime forward vs explainer vs torch autograd Input×Gradient vs token "
        "occlusion, side by side")
EXAMPLES = """examples:
  lrpc bench llama-bench --seq 256                          # the LLaMA-style performance workload
  lrpc bench model.onnx --seq 128 --json
"""


def add_arguments(p) -> None:
    p.add_argument("model", help="ONNX file or zoo name (llama-bench: the LLaMA-style performance workload)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--depth", type=int, metavar="N", help="llama-bench only: number of layers (default 8)")
    p.add_argument("--layers", help=argparse.SUPPRESS)   # the old name of --depth: refused (one meaning per flag)
    p.add_argument("--checkpoint", metavar="auto|N", help="compile the explainer with --checkpoint")
    p.add_argument("--occlusion", default="sample", choices=["sample", "full", "off"],
                   help="sample: time 2 batches of occluded sequences and extrapolate; full: all of them")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--workdir", help="keep the exported model and explainer here (default: a temporary folder, "
                   "removed at the end)")
    p.add_argument("--force", action="store_true", help="replace an explainer already in --workdir")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    import json

    from lrpc.bench import bench, format_result
    from lrpc.commands.common import check_counts
    from lrpc.errors import LrpcError
    if args.layers is not None:
        raise LrpcError(f"--layers N is now --depth N in `lrpc bench` (--layers means per-layer relevance in "
                        f"`lrpc explain`): give --depth {args.layers}")
    check_counts(args, "seq", "batch", "threads", "repeats", "depth")
    result = bench(args.model, seq=args.seq, batch=args.batch, threads=args.threads, repeats=args.repeats,
                   occlusion=args.occlusion, memory=not args.no_memory, checkpoint=args.checkpoint,
                   workdir=args.workdir, layers=args.depth, force=args.force)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0
