"""Corpus throughput, in process vs Ray (local, 2 actors), with and without length bucketing, and the peak
memory of an in-process run as the corpus grows 10× (issue 17).

    .venv/bin/python benchmarks/corpus.py [--inputs 2000] [--minilm-inputs 1000] [--memory 1000] [--workdir DIR]

The corpus: JSON lines of 1–60 random words (mixed lengths). Models: the zoo's tiny BERT ("bert", toy
tokenizer) and the real all-MiniLM-L6-v2 with mean pooling ("minilm-sentence", offline). Each run is a
fresh child process that loads the compiled explainer file (compiled first); throughput counts the whole
run (session and actor start-up included), but not the start of the local Ray instance (reported apart). Peak memory is
the child's RSS high-water mark (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(path: Path, n: int, seed: int = 0) -> Path:
    from lrpc.explain import TOY_WORDS
    words = [w for w in TOY_WORDS if w.isalpha()]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))}) + "\n")
    return path


def child(config: dict) -> dict:
    """One run in this (fresh) process: {"seconds", "rows", "ray_start_s", "peak_rss_mb"}."""
    from lrpc.corpus import Corpus, ModelSpec, Output
    from lrpc.corpus_run import explain_corpus
    ray_start = 0.0
    if config["engine"] == "ray":
        import ray
        started = time.perf_counter()
        ray.init(num_cpus=config["workers"], include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray_start = time.perf_counter() - started
    spec = ModelSpec(config["explainer"], tokenizer=config["tokenizer"])
    started = time.perf_counter()
    rows, _ = explain_corpus(spec, Corpus(config["corpus"]), Output(config["out"], {}, force=True),
                             engine=config["engine"], batch_size=config["batch_size"], bucket=config["bucket"],
                             workers=config.get("workers"), progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": rows, "ray_start_s": ray_start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(config: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", type=int, default=2000, help="corpus size for the tiny BERT")
    p.add_argument("--minilm-inputs", type=int, default=1000, help="corpus size for MiniLM")
    p.add_argument("--memory", type=int, default=1000, help="the 1× corpus of the memory runs (10× as well)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from lrpc import models
    from lrpc.explain import compiled_explainer
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lrpc-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = str(work / "cache")
    results = []
    for model, n in (("bert", args.inputs), ("minilm-sentence", args.minilm_inputs)):
        explainer = str(compiled_explainer(model, cache=cache)[0])   # compiled once; children load the file
        tokenizer = "toy" if model == "bert" else str(models.minilm_dir())
        corpus = make_corpus(work / f"corpus-{n}.jsonl", n)
        for engine in ("local", "ray"):
            for bucket in (True, False):
                config = {"explainer": explainer, "tokenizer": tokenizer, "corpus": str(corpus), "out": str(work / "out.parquet"),
                          "engine": engine, "bucket": bucket, "batch_size": args.batch_size,
                          "workers": 2 if engine == "ray" else None}
                r = measure(config)
                row = {"model": model, "inputs": n, "engine": engine + (" (2 actors)" if engine == "ray" else ""),
                       "bucketing": bucket, "seconds": round(r["seconds"], 1),
                       "inputs_per_s": round(n / r["seconds"], 1), "ray_start_s": round(r["ray_start_s"], 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
    bert = str(compiled_explainer("bert", cache=cache)[0])
    for scale in (1, 10):
        n = args.memory * scale
        corpus = make_corpus(work / f"corpus-{n}.jsonl", n, seed=1)
        r = measure({"explainer": bert, "tokenizer": "toy", "corpus": str(corpus), "out": str(work / "mem.parquet"),
                     "engine": "local", "bucket": True, "batch_size": args.batch_size})
        row = {"memory_run": "bert, in process", "inputs": n, "peak_rss_mb": round(r["peak_rss_mb"], 1),
               "seconds": round(r["seconds"], 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
