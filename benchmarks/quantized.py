"""Relevance of quantized and float16 models against the float model's, and the explainer's speed.

    .venv/bin/python benchmarks/quantized.py [--models bert gpt2 llama hf-vit minilm]
                                             [--kinds dynamic qdq qoperator dynamic-fused qdq-fused fp16
                                                      optimized-dynamic]

For each zoo model it exports the float32 ONNX model, makes the variants onnxruntime users make
(lrpc.deployed: quantize_dynamic, quantize_static in QDQ and QOperator formats, the dynamic and QDQ models as
onnxruntime's optimiser fuses them, convert_float_to_float16, and for BERT-like encoders quantize_dynamic of
the graph onnxruntime's transformer optimiser fuses: QEmbedLayerNormalization, QAttention), compiles an
AttnLRP explainer of each and reports, against the float model's explainer for the same target:
the cosine of the input relevance (mean over the batch rows), the top-5 agreement (|top-5 ∩ top-5| / 5 of
the attributed positions — tokens, or pixels summed over channels), whether the explainer's outputs equal
the variant's own bit for bit (onnxruntime's default optimisation level; and ORT_ENABLE_BASIC), and the
explainer's run time over the variant's forward (interleaved timing, lrpc.bench).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _relevance(explainer, inputs, target, position):
    result = explainer.explain(inputs, target=target, position=position)
    relevance = next(iter(result.relevance.values()))
    return relevance.reshape(relevance.shape[0], -1, *relevance.shape[2:]).astype(np.float64), result


def _per_position(relevance):
    """[batch, positions]: tokens as they are, an image's pixels summed over channels."""
    return relevance.sum(1).reshape(len(relevance), -1) if relevance.ndim == 4 else relevance.reshape(len(relevance), -1)


def compare(reference, variant) -> dict:
    a, b = _per_position(reference), _per_position(variant)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    k = min(5, a.shape[1])
    top = [len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a, b)]
    return {"cosine": float(cosine.mean()), "top5": float(np.mean(top))}


def _variant(entry, kind, source, work, feeds):
    """The `kind` variant of the model (optimized-dynamic: of its legacy export, the graph onnxruntime's transformer
    optimiser recognises, given the head count and width it needs)."""
    import onnx

    from lrpc import deployed
    if kind != "optimized-dynamic":
        return deployed.make(kind, source, work / f"{entry.name}.{kind}.onnx", feeds)
    module = entry.build()[0]
    legacy = work / f"{entry.name}.legacy.onnx"
    onnx.save(entry.export(module=module, exporter="legacy"), legacy)
    config = module.hf_model.config
    return deployed.make(kind, legacy, work / f"{entry.name}.{kind}.onnx", feeds,
                         num_heads=config.num_attention_heads, hidden_size=config.hidden_size)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["bert", "gpt2", "llama", "hf-vit", "minilm"])
    p.add_argument("--kinds", nargs="+", default=["dynamic", "qdq", "qoperator", "dynamic-fused", "qdq-fused", "fp16"])
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    import onnxruntime as ort

    import lrpc
    from lrpc import models, safeio
    from lrpc.bench import _feeds, _session, _time_interleaved

    with safeio.work_folder(args.workdir, "lrpc-quantized-") as work:
        rows = []
        for name in args.models:
            entry = models.get(name)
            batch = 2
            feeds = [{k: v.numpy() for k, v in entry.inputs(batch, args.seq, seed=s).items()} for s in range(4)]
            inputs = feeds[0]
            source = work / f"{name}.onnx"
            if not source.exists():
                entry.export(source)
            reference_path = work / f"{name}.explainer.onnx"
            lrpc.compile(str(source), output=reference_path, force=True)
            reference = lrpc.Explainer(reference_path)
            rank = reference.meta["rank"]
            position = np.full(batch, -1, np.int64) if rank == 3 else None
            logits = reference.forward(inputs)[reference.explained]
            target = (logits[:, -1] if rank == 3 else logits).argmax(-1).astype(np.int64)
            float_relevance, _ = _relevance(reference, inputs, target, position)
            for kind in args.kinds:
                path = _variant(entry, kind, source, work, feeds)
                explainer_path = work / f"{name}.{kind}.explainer.onnx"
                lrpc.compile(str(path), output=explainer_path, force=True)
                explainer = lrpc.Explainer(explainer_path)
                typed = {k: v.astype(np.float16) if v.dtype.kind == "f" and kind == "fp16" else v for k, v in inputs.items()}
                relevance, result = _relevance(explainer, typed, target, position)
                row = {"model": name, "kind": kind, **compare(float_relevance, relevance),
                       "finite": bool(np.isfinite(relevance).all())}
                for level in ("ORT_ENABLE_ALL", "ORT_ENABLE_BASIC"):
                    options = ort.SessionOptions()
                    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
                    lrpc.runtime.avoid_known_crashes(options, explainer.meta)
                    model_session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    explainer_session = ort.InferenceSession(str(explainer_path), options, providers=["CPUExecutionProvider"])
                    want = model_session.run(None, typed)[0]
                    got = explainer_session.run([explainer.explained], _feeds(typed, explainer_session, 0))[0]
                    row[f"exact_{level[11:].lower()}"] = bool(np.array_equal(want, got))
                    row[f"max_diff_{level[11:].lower()}"] = float(np.abs(want.astype(np.float64) - got).max())
                model_session, explainer_session = _session(path, args.threads), _session(explainer_path, args.threads)
                feed = _feeds(typed, explainer_session, int(target[0]))
                times = _time_interleaved({"forward": lambda: model_session.run(None, typed),
                                           "explainer": lambda: explainer_session.run(None, feed)}, args.repeats)
                row["explainer_over_forward"] = float(np.median(times["explainer"]) / np.median(times["forward"]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'model':<8} {'variant':<10} {'cosine':>7} {'top-5':>6} {'exact (default / basic)':>24} {'explainer/forward':>18}")
    for r in rows:
        exact = f"{'yes' if r['exact_all'] else 'no'} / {'yes' if r['exact_basic'] else 'no'}"
        print(f"{r['model']:<8} {r['kind']:<10} {r['cosine']:>7.4f} {r['top5']:>6.2f} {exact:>24} "
              f"{r['explainer_over_forward']:>17.1f}×")


if __name__ == "__main__":
    main()
