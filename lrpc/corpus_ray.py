"""The corpus pipeline on Ray Data (`lrpc explain … --out R.parquet --engine ray`, `pip install "lrpc[ray]"`).

The driver cuts the corpus into windows (byte offset, line numbers: a few numbers each, never the text);
`map_batches` sends each window to an actor of a pool; an actor builds its Attributor (one onnxruntime
session) once in `__init__`, reads its window from the file and explains it with the same `WindowExplainer`
as the in-process engine, so the rows are the same. The driver receives the tables in corpus order
(`preserve_order`) and writes them with the same `Output`, so resume and publishing are the in-process
ones too. Actors are restarted and their tasks retried when a worker dies: no window is lost, and none
is written twice (the driver writes each window's table once, in order).

Workers read the corpus file themselves: on a cluster it must be on storage every node sees (the same path).
"""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow as pa

from lrpc.corpus import Corpus, ModelSpec, WindowExplainer
from lrpc.errors import LrpcError


class _WindowWorker:
    """One actor: one Attributor, many windows."""

    def __init__(self, spec: ModelSpec, corpus: str, defaults: dict, batch_size: int, bucket: bool):
        self.corpus = Corpus(corpus, defaults)
        self.explainer = WindowExplainer(spec.build(), batch_size, bucket)

    def __call__(self, batch: dict) -> pa.Table:
        tables = [self.explainer.explain(list(self.corpus.lines(int(after), int(offset), int(count))))
                  for offset, after, count in zip(batch["offset"], batch["after"], batch["count"])]
        return pa.concat_tables(tables)


def explain_on_ray(spec: ModelSpec, corpus: Corpus, after: int, *, window: int, batch_size: int, bucket: bool,
                   address: str | None = None, workers: int | None = None) -> Iterator[pa.Table]:
    """Tables of rows, one per window of the lines after `after`, in corpus order."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise LrpcError('--engine ray needs Ray: pip install "lrpc[ray]"') from None
    threads = spec.threads or 1   # onnxruntime threads per actor, each actor reserving as many CPUs
    spec = ModelSpec(**{**spec.__dict__, "threads": threads})
    started = not ray.is_initialized()
    if started:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:   # a local instance on the CPUs this process may use (or what --workers × --threads asks)
            cpus = max(len(os.sched_getaffinity(0)), (workers or 0) * threads)
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        windows = [{"offset": o, "after": a, "count": c} for o, a, c in corpus.windows(window, after)]
        if not windows:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True   # tables come back in corpus order
        context.enable_progress_bars = False                # lrpc shows its own
        ds = ray.data.from_items(windows, override_num_blocks=len(windows))
        # Ray Data restarts a dead actor and retries its window (max_restarts = max_task_retries = -1 by
        # default for actor pools; tests/test_corpus_ray.py kills one)
        ds = ds.map_batches(_WindowWorker, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
                            fn_constructor_kwargs={"spec": spec, "corpus": str(corpus.path.resolve()),
                                                   "defaults": corpus.defaults, "batch_size": batch_size,
                                                   "bucket": bucket})
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """A HOST:PORT that does not answer is one line now (ray.init would retry it for minutes)."""
    import socket
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return   # "auto", ray://…: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise LrpcError(f"cannot reach the Ray cluster at {address} ({exc}): start one with `ray start --head` "
                        "or drop --address to run a local instance") from None
