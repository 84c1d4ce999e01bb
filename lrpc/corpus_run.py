"""Running a corpus: `explain_corpus` (in process, or on Ray through lrpc.corpus_ray) with a progress bar,
and the command-line side of `lrpc explain MODEL --file CORPUS --out OUT` (docs/design.md, "User-facing code").
The pieces it runs — reading the corpus, explaining a window, the resumable output — are in lrpc.corpus."""

from __future__ import annotations

import shutil

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from lrpc import safeio, validate
from lrpc.corpus import Corpus, ModelSpec, Output, WindowExplainer, batched
from lrpc.errors import LrpcError


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def explain_corpus(spec: ModelSpec, corpus: Corpus, out: Output, *, engine: str = "local", batch_size: int = 16,
                   window: int | None = None, bucket: bool = True, progress: bool = True, address: str | None = None,
                   workers: int | None = None) -> tuple[int, int]:
    """Explain every line of `corpus` after the ones `out` already holds; publish `out`. Returns (rows in
    `out`, error rows written by this call)."""
    try:   # (inside: a refused option leaves no OUT.partial/ behind either)
        validate.at_least_one(batch_size, "--batch-size")
        for value, flag in ((window, "--window"), (workers, "--workers")):
            if value is not None:
                validate.at_least_one(value, flag)
        window = window or 16 * batch_size
        after = out.done_through()
        attributor = spec.build()   # fails early on a bad model; compiles (and caches) the explainer once
        if engine == "local":
            explainer = WindowExplainer(attributor, batch_size, bucket)
            tables = (explainer.explain(lines) for lines in batched(corpus.lines(after), window))
        elif engine == "ray":
            from lrpc.corpus_ray import explain_on_ray
            del attributor   # the actors build their own
            tables = explain_on_ray(spec, corpus, after, window=window, batch_size=batch_size, bucket=bucket,
                                    address=address, workers=workers)
        else:
            raise LrpcError(f"unknown engine {engine!r}: use local or ray")
        errors = 0
        with _progress(corpus.count(), after, progress) as advance:
            for table in tables:
                out.write(table)
                errors += table.num_rows - table["error"].null_count
                if table.num_rows:
                    advance(table["line"][-1].as_py())
    except BaseException:
        if not out.parts():   # nothing to resume: leave no OUT.partial/ behind
            shutil.rmtree(out.partial, ignore_errors=True)
        raise
    return out.publish(), errors


class _Throughput(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} inputs/s")


class _progress:
    """A progress bar over corpus lines with the throughput and the time left, on stderr."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda line: None
        self.bar = Progress(TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), _Throughput(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("explaining", total=self.total, completed=self.done)
        return lambda line: self.bar.update(task, completed=line)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()


# ------------------------------------------------------------------------------------------------
# the command line: `lrpc explain MODEL --file CORPUS --out OUT`
# ------------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("corpus output (with --file: streamed, resumable, one row per input and target)")
    g.add_argument("--out", metavar="PATH", help="write the rows to PATH (.parquet or .jsonl) instead of printing them")
    g.add_argument("--resume", action="store_true", help="continue an interrupted --out run (OUT.partial/)")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help='local: in this process (default); ray: Ray Data actors (pip install "lrpc[ray]")')
    g.add_argument("--address", metavar="ADDR", help="Ray cluster to connect to (default: start a local one)")
    g.add_argument("--workers", type=int, metavar="N", help="Ray actors (default: one per CPU)")
    g.add_argument("--window", type=int, metavar="N", help="lines sorted by length together, and written as one part "
                   "(default: 16 × --batch-size)")
    g.add_argument("--no-bucketing", action="store_true", help="batch the lines in corpus order (more padding)")
    g.add_argument("--threads", type=int, metavar="N", help="onnxruntime threads per session (Ray: per actor, "
                   "default 1)")
    g.add_argument("--ort-config", action="append", metavar="KEY=VALUE", default=[],
                   help="an onnxruntime session config entry, e.g. session.intra_op.allow_spinning=0 (repeatable)")


def wanted(args) -> bool:
    """Whether the command line asks for a corpus run (then `run_cli` takes it, and insists on --out)."""
    return bool(args.out or args.resume or args.engine != "local" or args.address or args.workers or args.window
                or args.no_bucketing or args.threads or args.ort_config)


def run_cli(args) -> int:
    import sys
    if not (args.out and args.file):
        raise LrpcError("corpus options need --file CORPUS and --out PATH (.parquet or .jsonl)")
    extra = [flag for flag, given in (("--json", args.json), ("--html", args.html), ("--png", args.png),
                                      ("--layers", args.layers), ("--latent", args.latent)) if given]
    if extra:
        raise LrpcError(f"{', '.join(extra)} cannot be combined with --out: the rows go to {args.out}")
    config = {}
    for entry in args.ort_config:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise LrpcError(f"--ort-config {entry!r}: write KEY=VALUE")
        config[key] = value
    defaults = {"target": args.target, "contrast": args.contrast, "position": args.position, "top_k": args.top_k}
    if args.threads is not None:
        validate.at_least_one(args.threads, "--threads")
    spec = ModelSpec(str(args.model), args.tokenizer, args.preset, args.task, args.cache, args.threads, config)
    corpus = Corpus(args.file, defaults)
    settings = {"model": spec.model, "tokenizer": spec.tokenizer, "preset": spec.preset, "task": spec.task,
                "corpus": str(corpus.path.resolve()), "targets": defaults}
    sources = safeio.input_files(args.model, args.tokenizer, args.file)
    out = Output(args.out, settings, resume=args.resume, force=args.force, inputs=sources)
    try:
        rows, errors = explain_corpus(spec, corpus, out, engine=args.engine, batch_size=args.batch_size,
                                      window=args.window, bucket=not args.no_bucketing,
                                      progress=sys.stderr.isatty(), address=args.address, workers=args.workers)
    except KeyboardInterrupt:
        if out.partial.is_dir():
            print(f"{out.partial} keeps what was written: continue with --resume", file=sys.stderr)
        raise
    print(f"{args.out}: {rows} rows ({errors} error rows in this run)", file=sys.stderr)
    return 1 if errors else 0   # as `lrpc explain --file` without --out: the output is whole, some lines failed
