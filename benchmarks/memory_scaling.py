"""Peak resident memory of the explainer vs depth, with and without `--checkpoint auto` .

    .venv/bin/python benchmarks/memory_scaling.py --layers 4 8 16 32 --seq 1024 [--workdir DIR]

For each depth L it exports the llama-bench architecture with L layers (hidden 512), compiles a plain
and a checkpointed explainer, checks that their relevances agree (≤ 1e-5), and measures the peak RSS of
a fresh process that loads each explainer and runs it once on [1, seq] tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default="auto")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    import lrpc
    from lrpc import safeio
    from lrpc.bench import _session, peak_rss_mb, token_inputs
    from lrpc.models import zoo
    with safeio.work_folder(args.workdir, "lrpc-mem-") as work:
        rows = []
        for layers in args.layers:
            entry = zoo.llama_bench(layers)
            model = work / f"{entry.name}.onnx"
            if not model.exists():
                entry.export(model, external_data=True)
            plain, ckpt = work / f"{entry.name}.explainer.onnx", work / f"{entry.name}.explainer-ckpt.onnx"
            lrpc.compile(str(model), output=plain, force=True)
            lrpc.compile(str(model), output=ckpt, force=True, checkpoint=args.checkpoint)
            x = token_inputs(entry, 1, 64)
            feed = dict(x, lrp_target=np.array([1]), lrp_position=np.array([-1]))
            a = _session(plain, args.threads).run(None, feed)
            b = _session(ckpt, args.threads).run(None, feed)
            diff = max(float(np.abs(u - v).max()) for u, v in zip(a, b))
            row = {"layers": layers, "seq": args.seq, "max_abs_diff": diff,
                   "forward_mb": peak_rss_mb("forward", str(model), args.seq, 1, args.threads, None),
                   "explainer_mb": peak_rss_mb("explainer", str(plain), args.seq, 1, args.threads, None),
                   "checkpoint_mb": peak_rss_mb("explainer", str(ckpt), args.seq, 1, args.threads, None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\npeak RSS (MiB) at {args.seq} tokens, relative to L = {base['layers']}:")
    print(f"{'L':>4} {'forward':>10} {'explainer':>12} {'--checkpoint':>14} {'ratio plain':>12} {'ratio ckpt':>11}")
    for r in rows:
        print(f"{r['layers']:>4} {r['forward_mb']:>10.0f} {r['explainer_mb']:>12.0f} {r['checkpoint_mb']:>14.0f} "
              f"{r['explainer_mb'] / base['explainer_mb']:>12.2f} {r['checkpoint_mb'] / base['checkpoint_mb']:>11.2f}")


if __name__ == "__main__":
    sys.exit(main())
