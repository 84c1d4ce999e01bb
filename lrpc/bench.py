"""`lrpc bench`: time and peak memory of an explainer next to the model's own forward pass.

In one run, side by side (interleaved repetitions, so machine noise hits every method alike):

- ``forward``: the original model in onnxruntime;
- ``explainer``: the compiled explainer (outputs + relevance) in onnxruntime;
- ``torch``: eager PyTorch autograd Input×Gradient on the same weights (zoo models only);
- ``occlusion``: token occlusion, one forward per token (token replaced by id 0), batched.

Several lengths (`bench_lengths`) share one export and one compile; `format_curve` prints the explainer's
cost against the forward per length. With ``--targets K1,K2,…`` (`bench_targets`): one run of a
``--targets dynamic`` explainer for K targets against K single-target runs and K torch passes, and the K
run in forward passes, from the runs' least process CPU time (the work done, whatever the machine's load)
and from the wall-time medians.

Peak memory is the peak resident set size (VmHWM) of a fresh child process that loads the session and
runs it once: it includes the interpreter, onnxruntime and the weights. A repetition runs each method
three times back to back and keeps the fastest; times are the minimum and the median over the
repetitions, and the ratios use the medians.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lrpc import safeio
from lrpc.errors import LrpcError

OCCLUSION_CHUNK = 16  # sequences per occlusion forward
NO_BLOCKS = "explainer (no blocks)"   # --compare-blocks: the explainer compiled with causal_blocks=0


def _session(path, threads: int, optimise: bool = True, low_memory: bool | None = None):
    """low_memory None: as lrpc.Explainer does (no weight pre-packing for --checkpoint explainers)."""
    import onnxruntime as ort
    from lrpc import contract
    from lrpc.runtime import avoid_known_crashes
    meta = contract.peek_metadata(path)
    if low_memory is None:
        low_memory = contract.wants_low_memory(meta)
    o = ort.SessionOptions()
    if low_memory:
        o.add_session_config_entry("session.disable_prepacking", "1")
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    # no spin-waiting after a run: it would steal the cores from the next method timed (torch, occlusion)
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimise:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    avoid_known_crashes(o, meta)
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _feeds(inputs: dict, explainer_session, target: int) -> dict:
    names = {i.name for i in explainer_session.get_inputs()}
    batch = next(iter(inputs.values())).shape[0]
    feed = dict(inputs)
    if "lrp_target" in names:
        feed["lrp_target"] = np.full(batch, target, np.int64)
    if "lrp_position" in names:
        feed["lrp_position"] = np.full(batch, -1, np.int64)
    return feed


def token_inputs(entry_or_none, batch: int, seq: int, path=None) -> dict[str, np.ndarray]:
    """The zoo entry's own example inputs, else inputs built from the ONNX file's input specs."""
    if entry_or_none is not None:
        return {k: v.numpy() for k, v in entry_or_none.inputs(batch, seq).items()}
    return spec_inputs(path, batch, seq)


def spec_inputs(path, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Random inputs shaped and typed as the model's own (an explainer's lrp_* inputs are left out):
    symbolic dims are `batch` on axis 0 and `seq` elsewhere; an integer input is a mask of ones when its
    name says mask, positions 0..seq−1 for position ids, zeros for token types, else token ids below
    the vocabulary size read from the embedding table it feeds (100 when it feeds none)."""
    import onnx_ir as ir

    from lrpc.analysis import embedding_lookups
    from lrpc.loading import read_proto
    graph = ir.serde.deserialize_model(read_proto(path)).graph
    rng = np.random.default_rng(0)
    feeds = {}
    for value in graph.inputs:
        if value.name.startswith("lrp_"):
            continue
        shape = [d if isinstance(d, int) else (batch if axis == 0 else seq) for axis, d in enumerate(value.shape)]
        dtype = value.dtype.numpy()
        name = value.name.lower()
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name:
            feeds[value.name] = np.ones(shape, dtype)
        elif "position" in name:
            feeds[value.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif "type" in name:
            feeds[value.name] = np.zeros(shape, dtype)
        else:
            tables = [out.producer().inputs[0].shape[0] for out in embedding_lookups(graph, value)]
            vocab = min((t for t in tables if isinstance(t, int)), default=100)
            feeds[value.name] = rng.integers(min(3, vocab - 1), vocab, shape).astype(dtype)
    return feeds


def _occlusion_feeds(inputs: dict, chunk: int):
    """Batches of occluded copies of row 0: copy t has token t replaced by id 0."""
    ids = inputs["input_ids"][:1]
    seq = ids.shape[1]
    for start in range(0, seq, chunk):
        rows = np.repeat(ids, min(chunk, seq - start), axis=0)
        rows[np.arange(len(rows)), np.arange(start, start + len(rows))] = 0
        feed = {"input_ids": rows}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.repeat(inputs["attention_mask"][:1], len(rows), axis=0)
        yield feed


def _torch_gxi(module, inputs: dict, threads: int):
    """Eager autograd Input×Gradient at the embedding output, explaining logits[:, -1, 1]."""
    import torch
    torch.set_num_threads(threads)
    hf = getattr(module, "hf_model", module)
    ids = torch.from_numpy(inputs["input_ids"])
    mask = torch.from_numpy(inputs["attention_mask"]) if "attention_mask" in inputs else None

    def run():
        emb = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = hf(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        logits[:, -1, 1].sum().backward()
        return (emb * emb.grad).sum(-1)
    return run


def _time_interleaved(fns: dict, repeats: int, block: int = 3, cpu: dict | None = None) -> dict[str, list[float]]:
    """Per repetition, each method runs `block` times back to back and keeps its fastest run; methods
    alternate within every repetition, so a slow spell of the machine hits them alike and a single
    hiccup (a page fault, a preempted thread) does not decide a repetition. `cpu`, when given, receives
    the process CPU seconds of each kept run: on a machine shared with other jobs, wall time mostly
    measures the waiting, and the CPU time of the run is the steadier measure of its work."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (allocations, prepacking)
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            runs = []
            for _ in range(block):
                t, c = time.perf_counter(), time.process_time()
                fn()
                runs.append((time.perf_counter() - t, time.process_time() - c))
            fastest = min(runs)
            times[k].append(fastest[0])
            if cpu is not None:
                cpu.setdefault(k, []).append(fastest[1])
    return times


def peak_rss_mb(kind: str, path: str, seq: int, batch: int, threads: int, zoo: str | None, *extra) -> float:
    """Peak RSS (MiB) of a fresh process that loads `path` and runs it once on [batch, seq] tokens."""
    code = ("import sys, json; from lrpc.bench import _child_peak; "
            "print(json.dumps(_child_peak(*json.loads(sys.argv[1]))))")
    args = json.dumps([kind, path, seq, batch, threads, zoo, *extra])
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_peak(kind, path, seq, batch, threads, zoo, targets=None):
    """kind "targets": a `--targets dynamic` explainer explaining `targets` targets per row through
    lrpc.Explainer (so its target_chunk applies to an explainer without an in-graph loop)."""
    entry = None
    if zoo:
        from lrpc import models
        entry = models.get(zoo)
    inputs = token_inputs(entry, batch, seq, path)
    if kind == "targets":
        _k_run(path, inputs, targets, threads)()
        return _vm_hwm_mb()
    s = _session(path, threads)
    feed = _feeds(inputs, s, _target(entry)) if kind == "explainer" else inputs
    s.run(None, feed)
    return _vm_hwm_mb()


def _k_run(path, inputs: dict, k: int, threads: int):
    """One explanation of k targets per row (the next-token logits of classes 1..k at the last k positions)
    by the K explainer at `path`: a function to time."""
    from lrpc.runtime import Explainer
    explainer = Explainer(path, ["CPUExecutionProvider"], threads,
                          session_config={"session.intra_op.allow_spinning": "0"})
    batch, seq = inputs["input_ids"].shape
    target = np.broadcast_to(1 + np.arange(k) % 64, (batch, k))
    position = np.broadcast_to(-1 - np.arange(k) % seq, (batch, k))
    return lambda: explainer.explain(inputs, target=target, position=position)


def _target(entry) -> int:
    """Class 1 for zoo models (what the torch autograd run explains); class 0, which every output has,
    for a model file."""
    return 1 if entry is not None else 0


def _vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's, inherited across fork/exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(model: str, workdir: Path, checkpoint=None, layers: int | None = None, force: bool = False,
            plain_too: bool = False):
    """(zoo entry or None, torch module or None, model path, explainer path)."""
    import lrpc
    from lrpc import models
    entry = module = None
    if Path(model).is_file():
        path = Path(model)
    elif Path(model).exists() or model not in _zoo_names():
        raise LrpcError(f"{model} is not an ONNX file or a zoo model (`lrpc zoo` lists them)")
    else:
        entry = models.zoo.llama_bench(layers) if model == "llama-bench" and layers else models.get(model)
        module, _ = entry.build()
        path = workdir / f"{entry.name}.onnx"
        if not path.exists():
            entry.export(path, module=module, external_data=True)
    explainer = workdir / (path.stem + f".explainer{'-ckpt' + str(checkpoint) if checkpoint else ''}.onnx")
    kw = {"checkpoint": checkpoint} if checkpoint else {}
    t = time.perf_counter()
    lrpc.compile(str(path), output=explainer, force=force, **kw)
    compile_s = time.perf_counter() - t
    plain = None
    if plain_too:   # the same explainer without the causal blocks' branch (lrpc/causal_blocks.py)
        plain = explainer.with_name(explainer.stem + "-noblocks.onnx")
        lrpc.compile(str(path), output=plain, force=force, causal_blocks=0, **kw)
    return entry, module, path, explainer, compile_s, plain


def bench_lengths(model: str, seqs: list[int], batch: int = 1, threads: int = 2, repeats: int = 7,
                  occlusion: str = "sample", memory: bool = True, checkpoint=None, workdir=None,
                  layers: int | None = None, force: bool = False, torch: bool = True, plain_too: bool = False):
    """Time (and measure) the model's forward, its explainer, torch autograd (unless `torch` is False) and
    occlusion at each length of `seqs`, in order, with one export and one compile; yields one result per
    length as it is measured (`format_curve` prints the explainer/forward curve of them all). The model and
    explainer go to `workdir` (an explainer already there is replaced only with `force`), else to a
    temporary folder removed at the end. `plain_too`: also time the explainer compiled without causal blocks
    ("explainer (no blocks)")."""
    with safeio.work_folder(workdir, "lrpc-bench-") as folder:
        prepared = prepare(model, folder, checkpoint, layers, force or workdir is None, plain_too)
        for seq in seqs:
            yield _bench(model, prepared, seq, batch, threads, repeats, occlusion, memory, checkpoint, torch)


def _methods(path, explainer, module, entry, inputs: dict, threads: int, torch: bool = True):
    """The forward session and the functions timed in every bench: forward, explainer, torch (zoo models)."""
    fwd, exp = _session(path, threads), _session(explainer, threads)
    feed = _feeds(inputs, exp, _target(entry))
    fns = {"forward": lambda: fwd.run(None, inputs), "explainer": lambda: exp.run(None, feed)}
    if module is not None and torch:
        fns["torch"] = _torch_gxi(module, inputs, threads)
    return fwd, fns


def _bench(model, prepared, seq, batch, threads, repeats, occlusion, memory, checkpoint, torch) -> dict:
    entry, module, path, explainer, compile_s, plain = prepared
    inputs = token_inputs(entry, batch, seq, path)
    fwd, fns = _methods(path, explainer, module, entry, inputs, threads, torch)
    if plain is not None:
        without = _session(plain, threads)
        feed = _feeds(inputs, without, _target(entry))
        fns[NO_BLOCKS] = lambda: without.run(None, feed)
    cpu = {}
    times = _time_interleaved(fns, repeats, cpu=cpu)
    result = {"model": str(model), "seq": seq, "batch": batch, "threads": threads, "repeats": repeats,
              "compile_s": compile_s, "checkpoint": checkpoint, "load": os.getloadavg()[0],
              "ms": {k: {"min": 1e3 * min(v), "median": 1e3 * float(np.median(v))} for k, v in times.items()},
              "cpu_ms": {k: 1e3 * float(np.median(v)) for k, v in cpu.items()}}
    if occlusion != "off" and "input_ids" in inputs:
        chunks = list(_occlusion_feeds(inputs, OCCLUSION_CHUNK))
        measured = chunks if occlusion == "full" else chunks[:2]
        fwd.run(None, measured[0])
        t = time.perf_counter()
        for c in measured:
            fwd.run(None, c)
        spent = time.perf_counter() - t
        per_row = spent / sum(len(c["input_ids"]) for c in measured)
        result["ms"]["occlusion"] = {"min": 1e3 * per_row * seq, "median": 1e3 * per_row * seq,
                                     "measured_rows": sum(len(c["input_ids"]) for c in measured)}
    med = {k: v["median"] for k, v in result["ms"].items()}
    result["ratios"] = {"explainer/forward": med["explainer"] / med["forward"],
                        "explainer/forward (cpu)": result["cpu_ms"]["explainer"] / result["cpu_ms"]["forward"]}
    if NO_BLOCKS in med:
        result["ratios"][f"{NO_BLOCKS}/forward (cpu)"] = result["cpu_ms"][NO_BLOCKS] / result["cpu_ms"]["forward"]
    if "torch" in med:
        result["ratios"]["torch/explainer"] = med["torch"] / med["explainer"]
    if "occlusion" in med:
        result["ratios"]["occlusion/explainer"] = med["occlusion"] / med["explainer"]
    if memory:
        zoo = entry.name if entry is not None and entry.name in _zoo_names() else None
        result["peak_rss_mb"] = {"forward": peak_rss_mb("forward", str(path), seq, batch, threads, zoo),
                                 "explainer": peak_rss_mb("explainer", str(explainer), seq, batch, threads, zoo)}
    return result


def bench_targets(model: str, targets: list[int], seq: int = 256, batch: int = 1, threads: int = 2,
                  repeats: int = 5, chunk: int | None = None, memory: bool = True, workdir=None,
                  layers: int | None = None, force: bool = False) -> dict:
    """Many targets per input, side by side in one process: one run of a `--targets dynamic`
    explainer for K targets against K single-target explainer runs and K torch autograd Input×Gradient
    passes, for each K in `targets`; and the K run in forward passes. chunk: the K explainer's
    in-graph chunk (compile's target_chunk; None: its default; 0: no loop, lrpc.Explainer's chunks)."""
    if workdir is not None:
        safeio.folder(workdir, "--workdir")
        return _bench_targets(model, targets, Path(workdir), seq, batch, threads, repeats, chunk, memory, layers,
                              force)
    with safeio.scratch_folder("lrpc-bench-") as scratch:
        return _bench_targets(model, targets, scratch, seq, batch, threads, repeats, chunk, memory, layers, True)


def _bench_targets(model, targets, workdir: Path, seq, batch, threads, repeats, chunk, memory, layers,
                   force) -> dict:
    import lrpc
    from lrpc.k_chunks import CHUNK
    chunk = CHUNK if chunk is None else chunk
    entry, module, path, explainer, compile_s, _ = prepare(model, workdir, None, layers, force)
    many = workdir / (path.stem + ".explainer-targets.onnx")
    lrpc.compile(str(path), output=many, force=force, targets="dynamic", target_chunk=chunk)
    inputs = token_inputs(entry, batch, seq, path)
    _, fns = _methods(path, explainer, module, entry, inputs, threads)
    fns.update({f"K={k}": _k_run(many, inputs, k, threads) for k in targets})
    load = os.getloadavg()[0]
    cpu = {}
    # one run of each per repetition, whatever its length: every method gets as many tries at its minimum
    times = _time_interleaved(fns, repeats, block=1, cpu=cpu)
    med = {name: 1e3 * float(np.median(v)) for name, v in times.items()}
    least = {name: 1e3 * min(v) for name, v in cpu.items()}
    result = {"model": str(model), "seq": seq, "batch": batch, "threads": threads, "repeats": repeats,
              "chunk": chunk, "compile_s": compile_s, "ms": med, "cpu_ms": least, "targets": {},
              "load": [load, os.getloadavg()[0]]}
    for k in targets:
        one = med[f"K={k}"]
        row = {"K run ms": one, "K single runs ms": k * med["explainer"],
               "K run / K single runs": one / (k * med["explainer"]),
               "K run in forwards": one / med["forward"], "forward constant": (one / med["forward"] - 1) / k,
               "K run / K single runs (cpu)": least[f"K={k}"] / (k * least["explainer"]),
               **_forward_cost(least[f"K={k}"], least["forward"], k)}
        if "torch" in med:
            row["K torch passes ms"] = k * med["torch"]
            row["K torch passes / K run"] = k * med["torch"] / one
        result["targets"][k] = row
    if memory:
        zoo = entry.name if entry is not None and entry.name in _zoo_names() else None
        result["peak_rss_mb"] = {"explainer": peak_rss_mb("explainer", str(explainer), seq, batch, threads, zoo)}
        for k in targets:
            result["peak_rss_mb"][f"K={k}"] = peak_rss_mb("targets", str(many), seq, batch, threads, zoo, k)
    return result


def _forward_cost(k_run: float, forward: float, k: int) -> dict:
    """The K run in forward passes of the model, from CPU times: the issue's "an attribution matrix of N
    targets costs ≤ 1 + c·N forwards" in its two equivalent forms, total / forward (against 1 + 0.9·K)
    and the per-target constant c = (K run − 1 forward) / (K · forward)."""
    return {"K run in forwards (cpu)": k_run / forward, "forward constant (cpu)": (k_run / forward - 1) / k}


def _chunking(chunk: int) -> str:
    from lrpc.runtime import TARGET_CHUNK
    return f"in-graph chunks of {chunk}" if chunk else f"without a loop (runs of {TARGET_CHUNK} targets)"


def format_targets(r: dict) -> str:
    lines = [f"lrpc bench {r['model']} --targets  seq {r['seq']}  batch {r['batch']}  threads {r['threads']}  "
             f"({r['repeats']} interleaved repetitions; K explainer {_chunking(r['chunk'])}; load {r['load'][0]:.1f} → "
             f"{r['load'][1]:.1f})",
             "  wall medians: " + "  ".join(f"{k} {v:.1f} ms" for k, v in r["ms"].items() if not k.startswith("K=")),
             "  CPU minima:   " + "  ".join(f"{k} {v:.1f} ms" for k, v in r["cpu_ms"].items() if not k.startswith("K=")),
             "  K single runs / K torch passes: K × one (wall median; cpu: minimum).  forwards: the K run over one forward; "
             "constant c = (K run − 1 forward) / (K · forward),",
             "  i.e. the K run costs 1 + c·K forwards; cpu: from the runs' minimum process CPU time (the steadier "
             "measure on a shared machine), wall: from the medians"]
    peaks = r.get("peak_rss_mb", {})
    header = (f"  {'K':>4} {'K run ms':>10} {'/K single':>10} {'(cpu)':>6} {'torch/K run':>12} {'forwards':>9} {'1+0.9K':>7} "
              f"{'c cpu':>6} {'c wall':>7}")
    lines.append(header + ("  peak MiB (× single)" if peaks else ""))
    for k, row in r["targets"].items():
        torch = f"{row['K torch passes / K run']:11.2f}x" if "K torch passes / K run" in row else f"{'-':>12}"
        line = (f"  {k:>4} {row['K run ms']:10.1f} {row['K run / K single runs']:9.2f}x "
                f"{row['K run / K single runs (cpu)']:5.2f}x {torch} "
                f"{row['K run in forwards (cpu)']:9.2f} {1 + 0.9 * int(k):7.1f} {row['forward constant (cpu)']:6.3f} "
                f"{row['forward constant']:7.3f}")
        if peaks:
            line += f"  {peaks[f'K={k}']:6.0f} ({peaks[f'K={k}'] / peaks['explainer']:.2f}x)"
        lines.append(line)
    if peaks:
        lines.append(f"  single-target explainer peak RSS {peaks['explainer']:.0f} MiB")
    return "\n".join(lines)


def _zoo_names():
    from lrpc import models
    return set(models.names()) | set(models.zoo.BENCH)


def format_curve(results: list[dict]) -> str:
    """The explainer's cost against the forward per length, side by side at each length: the medians of
    wall time and of the runs' process CPU time (the steadier one on a shared machine), and the load."""
    r0 = results[0]
    lines = [f"lrpc bench {r0['model']}: explainer / forward by length (batch {r0['batch']}, threads "
             f"{r0['threads']}, medians of {r0['repeats']} interleaved repetitions)",
             f"  {'seq':>6} {'forward ms':>11} {'explainer ms':>13} {'wall ratio':>11} {'cpu ratio':>10} {'load':>6}"
             + (f" {'no blocks, cpu':>15}" if NO_BLOCKS in r0["ms"] else "")]
    for r in results:
        lines.append(f"  {r['seq']:>6} {r['ms']['forward']['median']:11.1f} {r['ms']['explainer']['median']:13.1f} "
                     f"{r['ratios']['explainer/forward']:10.2f}x {r['ratios']['explainer/forward (cpu)']:9.2f}x "
                     f"{r['load']:6.1f}"
                     + (f" {r['ratios'][NO_BLOCKS + '/forward (cpu)']:14.2f}x" if NO_BLOCKS in r["ms"] else ""))
    return "\n".join(lines)


def format_result(r: dict) -> str:
    lines = [f"lrpc bench {r['model']}  seq {r['seq']}  batch {r['batch']}  threads {r['threads']}  "
             f"({r['repeats']} interleaved repetitions, best of 3 each; compile {r['compile_s']:.1f} s"
             f"{', checkpoint ' + str(r['checkpoint']) if r['checkpoint'] else ''}; load {r['load']:.1f})"]
    for k, v in r["ms"].items():
        extra = f"  (extrapolated from {v['measured_rows']} occluded sequences)" if "measured_rows" in v else ""
        lines.append(f"  {k:<10} median {v['median']:9.1f} ms   min {v['min']:9.1f} ms{extra}")
    for k, v in r["ratios"].items():
        lines.append(f"  {k:<23} {v:7.2f}x")
    for k, v in r.get("peak_rss_mb", {}).items():
        lines.append(f"  peak RSS {k:<10} {v:8.0f} MiB")
    return "\n".join(lines)
