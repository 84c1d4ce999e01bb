"""lrpc bench: time and peak memory of the explainer against the forward, torch autograd and occlusion."""

from __future__ import annotations

import argparse

HELP = ("time and peak memory: onnxruntime forward vs explainer vs torch autograd Input×Gradient vs token "
        "occlusion, side by side")
EXAMPLES = """examples:
  lrpc bench llama-bench --seq 256                          # the LLaMA-style performance workload
  lrpc bench model.onnx --seq 128 --json
  lrpc bench llama-bench --seq 256 --targets 1,4,16,64     # K targets in one run vs K runs vs K torch passes
  lrpc bench llama-bench --seq 64,256,1024 --no-memory      # a sweep over lengths, then the explainer/forward curve
  lrpc bench llama-bench --seq 64,256,1024,2048,4096 --no-torch --occlusion off --no-memory --repeats 3
  lrpc bench llama-bench --seq 1024,4096 --compare-blocks --no-torch --occlusion off --no-memory   # what the blocks buy
"""


def add_arguments(p) -> None:
    p.add_argument("model", help="ONNX file or zoo name (llama-bench: the LLaMA-style performance workload)")
    p.add_argument("--seq", type=_counts, default=[256], metavar="N[,N…]", help="tokens (several: one run each)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--depth", type=int, metavar="N", help="llama-bench only: number of layers (default 8)")
    p.add_argument("--layers", help=argparse.SUPPRESS)   # the old name of --depth: refused (one meaning per flag)
    p.add_argument("--checkpoint", metavar="auto|N", help="compile the explainer with --checkpoint")
    p.add_argument("--occlusion", default="sample", choices=["sample", "full", "off"],
                   help="sample: time 2 batches of occluded sequences and extrapolate; full: all of them")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--no-torch", action="store_true", help="skip torch autograd (its [T, T] activations at long "
                   "lengths)")
    p.add_argument("--workdir", help="keep the exported model and explainer here (default: a temporary folder, "
                   "removed at the end)")
    p.add_argument("--force", action="store_true", help="replace an explainer already in --workdir")
    p.add_argument("--targets", type=_counts, metavar="K[,K…]", help="compare one run of a --targets explainer "
                   "for K targets with K single-target runs and K torch autograd passes, for each K")
    p.add_argument("--chunk", type=int, metavar="C", help="with --targets: the K explainer's in-graph chunk "
                   "(compile's --target-chunk; 0: no loop)")
    p.add_argument("--compare-blocks", action="store_true", help="also time the explainer compiled without "
                   "causal blocks (--causal-blocks 0), side by side")
    p.add_argument("--json", action="store_true")


def _counts(text: str) -> list[int]:
    """'256' or '64,256,1024': whole numbers ≥ 1 (checked in run, so a bad one is one lrpc error line)."""
    return [int(x) if x.strip().lstrip("-").isdigit() else x for x in text.split(",")]


def run(args) -> int:
    import json

    from lrpc import validate
    from lrpc.bench import bench_lengths, bench_targets, format_curve, format_result, format_targets
    from lrpc.commands.common import check_counts
    from lrpc.errors import LrpcError
    if args.layers is not None:
        raise LrpcError(f"--layers N is now --depth N in `lrpc bench` (--layers means per-layer relevance in "
                        f"`lrpc explain`): give --depth {args.layers}")
    check_counts(args, "batch", "threads", "repeats", "depth")
    if args.chunk is not None:
        validate.target_chunk_option(args.chunk, "--chunk {value}")
    for flag in ("seq", "targets"):
        for value in getattr(args, flag) or ():
            validate.at_least_one(value, f"--{flag}")
    if args.targets is None and (args.chunk is not None):
        raise LrpcError("--chunk is the --targets explainer's in-graph chunk: give --targets, or drop --chunk")
    if args.targets is not None and args.compare_blocks:
        raise LrpcError("--compare-blocks times the --seq curve, not --targets: drop one of them")
    if args.targets is not None and args.checkpoint:
        raise LrpcError("--targets with --checkpoint is not supported yet: drop one of them")
    if args.targets:
        results = []
        for seq in args.seq:
            results.append(bench_targets(args.model, args.targets, seq=seq, batch=args.batch, threads=args.threads,
                                         repeats=args.repeats, chunk=args.chunk, memory=not args.no_memory,
                                         workdir=args.workdir, layers=args.depth, force=args.force))
            if not args.json:
                print(format_targets(results[-1]), flush=True)
    else:
        results = []
        for result in bench_lengths(args.model, args.seq, batch=args.batch, threads=args.threads,
                                    repeats=args.repeats, occlusion=args.occlusion, memory=not args.no_memory,
                                    checkpoint=args.checkpoint, workdir=args.workdir, layers=args.depth,
                                    force=args.force, torch=not args.no_torch, plain_too=args.compare_blocks):
            results.append(result)
            if not args.json:
                print(format_result(result), flush=True)
        if len(results) > 1 and not args.json:
            print(format_curve(results))
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    return 0
