"""The pipeline: load → canonicalise → analyse → assign rules → emit relevance → optimise → save."""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lrpc import __version__, contract, planio, safeio, untouched, validate
from lrpc.analysis import find_attributions, vocabulary
from lrpc.causal_blocks import BLOCKS as CAUSAL_BLOCKS
from lrpc.causal_blocks import MIN_TOKENS as CAUSAL_MIN_TOKENS
from lrpc.canonicalize import canonicalize
from lrpc.decompose import decompose_fused, protect_nonstandard_ops
from lrpc.emitter import Emitter
from lrpc.errors import LrpcError
from lrpc.graph import Builder
from lrpc.k_chunks import CHUNK as TARGET_CHUNK
from lrpc.k_chunks import chunk_targets
from lrpc.loading import check_writable, read_proto, save_model, to_ir
from lrpc.optimise import optimise
from lrpc.plan import Plan
from lrpc.presets import Options, assign_rules



def load(model) -> ir.Model:
    """Any accepted model form → canonical onnx-ir model (opset ≥ 18, shapes inferred, nodes sorted)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto, base = read_proto(path), path.parent
    elif isinstance(model, onnx.ModelProto):
        proto, base = model, None
    elif isinstance(model, ir.Model):
        proto, base = ir.to_proto(model), None
    else:
        raise LrpcError(f"cannot compile a {type(model).__name__}: pass an ONNX path, an onnx.ModelProto, or a "
                        "torch.nn.Module with example_inputs")
    if contract.read_metadata({p.key: p.value for p in proto.metadata_props}) is not None:
        raise LrpcError("this model is already an lrpc explainer; compile the original model instead")
    proto = protect_nonstandard_ops(proto)  # onnxruntime's default-domain fused norms survive opset conversion
    ir_model = to_ir(canonicalize(proto), base)
    decompose_fused(ir_model)
    common_passes.NameFixPass()(ir_model)  # every node named, so errors and plans can point at it
    ir_model.graph.sort()
    return ir_model


def analyse_and_plan(ir_model: ir.Model, preset: str, attribute=None, options: Options = Options()):
    graph = ir_model.graph
    attributions = find_attributions(graph, attribute)
    sources = {p for a in attributions for p in a.points}
    plan, carrying = assign_rules(graph, sources, preset, options)
    return attributions, carrying, plan


def plan_model(model, preset: str = "attnlrp", attribute=None, options: Options = Options()) -> Plan:
    """The rule assignment alone, without emitting anything."""
    ir_model = load(model)
    return analyse_and_plan(ir_model, preset, attribute, options)[2]


def plan_document(model, preset: str = "attnlrp", attribute=None, options: Options = Options(),
                  source: str = "", components: str | list[str] | None = None) -> dict:
    """The plan as `lrpc plan --format json` writes it (rows in graph order and a summary), with what each
    component selector resolves to when `components` names some."""
    from lrpc.components import parse, resolve
    ir_model = load(model)
    plan = analyse_and_plan(ir_model, preset, attribute, options)[2]
    doc = planio.to_json(plan, ir_model.graph, source)
    selectors = parse(components)
    if selectors:
        doc["components"] = [c.describe() for c in resolve(ir_model, selectors)]
    return doc


def build_explainer(ir_model: ir.Model, *, preset: str = "attnlrp", output_name: str | None = None,
                    attribute: list[str] | None = None, seed: str = "target", latent: str | None = None,
                    options: Options = Options(), embeddings_input: bool = False,
                    checkpoint: int | str | None = None, targets: int | str | None = None,
                    components: str | list[str] | None = None, per_position: bool = False,
                    intervene: str | list[str] | None = None, conditions: str | list[str] | None = None,
                    forward_mode: str = "auto", target_chunk: int = 0) -> ir.Model:
    graph = ir_model.graph
    if targets is not None and checkpoint:
        raise LrpcError("--targets with --checkpoint is not supported yet: drop one of them")
    fixed_k = targets if isinstance(targets, int) else None
    chunked = targets is not None and target_chunk > 0 and (fixed_k is None or fixed_k > target_chunk)
    if chunked and fixed_k is not None:   # the loop's body sees a chunk of K: emitted for any K, fixed after
        targets = "dynamic"
    y = contract.explained_output(graph, output_name)
    exposed = {}
    if embeddings_input:  # the embedding lookup's output becomes a model input (lrpc/embeddings.py)
        from lrpc import embeddings
        exposed, attribute = embeddings.expose(graph, attribute)
    explained_components, scales, conditioned = _components(ir_model, components, intervene, conditions)
    forward = untouched.forward_nodes(graph) if untouched.needed(graph, forward_mode) else None   # (untouched.py)
    model_outputs = list(graph.outputs)
    attributions, carrying, plan = analyse_and_plan(ir_model, preset, attribute, options)
    if exposed:
        attributions = embeddings.as_token_attributions(graph, attributions, exposed)
    if y not in carrying:
        raise LrpcError(f"output '{y.name}' does not depend on any attributed input "
                        f"({', '.join(a.input.name for a in attributions)}); choose another --output or --attribute")
    latents = _latent_tensors(graph, carrying, latent)
    b = Builder(graph)
    emitter = Emitter(graph, plan, carrying, b)
    if conditioned:   # CRP's conditional relevance (docs/design.md, "Conditional heatmaps")
        from lrpc.components import condition
        condition_inputs = condition(graph, emitter, conditioned)
    wanted = {p for a in attributions for p in a.points} | set(latents) | {c.value for c in explained_components}
    seed_grad = contract.seed(graph, b, y, seed, targets)
    if targets is not None:  # ĝ gains a leading K axis (docs/design.md, "Many targets: the K axis")
        emitter.with_targets(seed_grad, contract.k_dim(targets))
    grads = emitter.run({y: seed_grad}, wanted)
    for a in attributions:
        contract.add_output(graph, b, contract.relevance_of(b, emitter, a, grads),
                            contract.RELEVANCE_PREFIX + a.input.name, contract.relevance_shape(a.input, targets))
    for value in latents:
        contract.add_output(graph, b, contract.latent_relevance(b, emitter, value, grads),
                            contract.RELEVANCE_PREFIX + value.name, contract.relevance_shape(value, targets))
    for c in explained_components:   # one relevance per unit (docs/design.md, "Components and interventions")
        from lrpc.components import output_shape, relevance_output
        r = relevance_output(b, contract.latent_relevance(b, emitter, c.value, grads), c, targets is not None,
                             per_position)
        contract.add_output(graph, b, r, contract.RELEVANCE_PREFIX + c.name,
                            output_shape(c, None if targets is None else contract.k_dim(targets), per_position))
    remat = None
    if checkpoint:  # rematerialise forward segments during the relevance pass (lrpc/checkpoint.py)
        from lrpc.checkpoint import rematerialise
        remat = rematerialise(graph, carrying, y, emitter.totals, b, checkpoint)
    optimise(ir_model, seeds=(contract.TARGET, contract.SEED) if targets is not None else ())
    if chunked:   # the relevance pass in a Loop over chunks of targets (lrpc/k_chunks.py)
        chunk_targets(graph, target_chunk, fixed_k)
        targets = fixed_k or targets
    contract.write_metadata(ir_model, {
        "lrpc_version": __version__, "preset": preset, "output": y.name, "seed": seed,
        "rank": y.shape.rank(), "attributed": {a.input.name: a.kind for a in attributions},
        **({"vocab": vocab} if (vocab := {a.input.name: n for a in attributions if (n := vocabulary(a))}) else {}),
        "latent": [v.name for v in latents], **({"embeddings_input": exposed} if exposed else {}),
        "options": {k: v for k, v in vars(options).items() if v not in (None, {})},
        **({"checkpoint": {"requested": checkpoint, **remat}} if remat is not None else {}),
        **({"targets": targets} if targets is not None else {}),
        **({"target_chunk": target_chunk} if chunked else {}),
        **({"unsafe_optimizers": unsafe} if (unsafe := contract.unsafe_optimizers(graph)) else {}),
        **({"untouched_forward": True} if forward is not None else {}),
        **({"components": [c.describe() for c in explained_components], "per_position": per_position}
           if explained_components else {}),
        **({"interventions": scales} if scales else {}),
        **({"conditions": condition_inputs} if conditioned else {}),
    })
    if forward is not None:   # the outputs from a forward nothing else reads, as onnxruntime runs the model
        untouched.attach(graph, forward, model_outputs)
    return ir_model


def with_causal_blocks(prepared, blocks: int | None, min_tokens: int, **settings) -> ir.Model:
    """build_explainer(prepared(), **settings), joined by a run-time guard to the same explainer compiled on
    the row-block form of its causal self-attention (lrpc/causal_blocks.py) when it has one. `prepared`
    gives a fresh copy of the loaded model each call (a second only for a model that gets blocks);
    blocks 0 / None: the plain explainer alone."""
    from lrpc import causal_blocks
    from lrpc.components import parse
    first = prepared()
    # not where a head is a unit (the blocks cut its product apart) or the untouched copy gives the outputs
    served = not any("heads" in parse(settings.get(k)) for k in ("components", "intervene", "conditions")) \
        and not untouched.needed(first.graph, settings.get("forward_mode", "auto"))
    # read before build_explainer changes the graph, so a model without causal masks is loaded only once
    masks = causal_blocks.causal_masks(first.graph, blocks) if blocks and served else []
    plain = build_explainer(first, **settings)
    if not masks:
        return plain
    model = prepared()
    causal_blocks.rewrite(model.graph, blocks)
    latent = contract.read_metadata(plain.metadata_props)["latent"]   # the same tensors, not their block copies
    if settings.get("latent"):
        present = {v.name for node in model.graph for v in node.outputs}
        if not set(latent) <= present:
            return plain   # a latent tensor the blocks replace (the attention weights)
        settings = {**settings, "latent": "^(" + "|".join(re.escape(name) for name in latent) + ")$"}
    return causal_blocks.guarded(plain, build_explainer(model, **settings), masks, blocks, min_tokens)


def _components(ir_model: ir.Model, components, intervene, conditions):
    """The components whose relevance is output, the names of the scale inputs added for `intervene`, and
    the components `conditions` names (their mask inputs are added with the walk)."""
    from lrpc.components import intervene as add_scales
    from lrpc.components import SELECTORS, parse, resolve
    explained, scaled, conditioned = parse(components), parse(intervene), parse(conditions)
    if not explained and not scaled and not conditioned:
        return [], [], []
    resolved = resolve(ir_model, [s for s in SELECTORS if s in explained or s in scaled or s in conditioned])
    scales = add_scales(ir_model.graph, [c for c in resolved if c.kind in scaled])
    return ([c for c in resolved if c.kind in explained], scales,
            [c for c in resolved if c.kind in conditioned])


def _latent_tensors(graph: ir.Graph, carrying: set[ir.Value], pattern: str | None) -> list[ir.Value]:
    if not pattern:
        return []
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise LrpcError(f"--latent {pattern!r} is not a valid regular expression ({exc})") from None
    found = [v for node in graph for v in node.outputs if v in carrying and v.name and regex.search(v.name)]
    if not found:
        raise LrpcError(f"--latent {pattern!r} matches no relevance-carrying tensor; `lrpc plan --tensors` "
                        "lists their names")
    return found


def compile(model, example_inputs=None, *, preset: str = "attnlrp", output: str | os.PathLike | None = None,
            output_name: str | None = None, attribute: list[str] | None = None, seed: str = "target",
            latent: str | None = None, force: bool = False, epsilon: float | None = None,
            gamma_linear: float | None = None, gamma_conv: float | None = None, rule_nodes: str | None = None,
            embeddings_input: bool = False, reuse_weights: bool = False, checkpoint: int | str | None = None,
            targets: int | str | None = None, components: str | list[str] | None = None,
            components_per_position: bool = False, intervene: str | list[str] | None = None,
            conditions: str | list[str] | None = None, forward: str = "auto",
            causal_blocks: int | None = CAUSAL_BLOCKS, causal_min_tokens: int = CAUSAL_MIN_TOKENS,
            target_chunk: int = TARGET_CHUNK, **frontend_options) -> onnx.ModelProto:
    """Compile a model into an explainer (an onnx.ModelProto); with `output=`, also write it atomically.

    `model` is an ONNX path, an onnx.ModelProto, or a torch.nn.Module with `example_inputs` (a dict of
    named tensors), which is exported with torch.export first. With `reuse_weights=True` and `output=`, the
    explainer's copies of the model's external-data weights are references to the original weights file
    (which must lie in the explainer's folder or below it) instead of copies. With `targets=K` (an int, or
    "dynamic" for a K chosen per run) the explainer explains K targets per input row in one run (the
    K-axis contract, docs/design.md, "Many targets: the K axis"). `components="mlp,heads,residual"` adds
    `relevance.<component>.<layer>` outputs (one value per unit, per position with
    `components_per_position=True`); `intervene="mlp,heads"` adds optional `lrp_scale.<component>.<layer>`
    inputs that scale the units in the forward (docs/design.md, "Components and interventions").
    `conditions="mlp,heads"` adds optional `lrp_mask.<component>.<layer>` / `lrp_bypass.…` inputs for CRP's
    conditional relevance (`Explainer.explain(condition=…)`; docs/design.md, "Conditional heatmaps").
    `forward=` says where the outputs come from (lrpc/untouched.py): "copy", an untouched copy of the forward
    (bit for bit the model's at every onnxruntime level, one more forward per run); "shared", the forward the
    relevance pass reads (float rounding off where onnxruntime fuses less); "auto" (default), the copy for
    quantized and float16 / bfloat16 models only.
    `causal_blocks=N` (default 8; 0 turns it off) also compiles the model's causal self-attention cut into N
    query-row blocks that skip the masked upper triangle, used for runs of at least `causal_min_tokens`
    tokens whose masks are causal (checked in the graph per run; lrpc/causal_blocks.py).
    `target_chunk=C` (with `targets`; default 4; 0: off) runs the relevance pass in a Loop over chunks of
    at most C targets after one forward (lrpc/k_chunks.py): memory bounded whatever K, without repeating
    the forward per chunk (faster than all K at once under load; the same on a quiet machine).
    """
    if "layers" in frontend_options:   # the old name: `layers` now means per-layer relevance (Attributor)
        raise LrpcError("compile(layers=REGEX) is now compile(rule_nodes=REGEX): the nodes --epsilon / --gamma-* "
                        "apply to (per-layer relevance: lrpc.Attributor(model, layers=True))")
    targets = validate.targets_option(targets)
    target_chunk = validate.target_chunk_option(target_chunk)
    validate.forward_option(forward)
    causal_blocks, causal_min_tokens = validate.causal_blocks_option(causal_blocks, causal_min_tokens)
    validate.components_options(components, components_per_position)
    options = Options(epsilon=epsilon, gamma_linear=gamma_linear, gamma_conv=gamma_conv, rule_nodes=rule_nodes)
    sources = safeio.input_files(model)
    if output is not None:  # an output that is the model (or its data) is refused before any work
        check_writable(output, force, sources)
    if example_inputs is not None or is_torch_module(model):
        from lrpc.frontend import torch_to_onnx
        model = torch_to_onnx(model, example_inputs, **frontend_options)
    ir_model = with_causal_blocks(lambda: load(model), causal_blocks, causal_min_tokens, preset=preset,
                                  output_name=output_name, attribute=attribute, seed=seed, latent=latent,
                                  options=options, embeddings_input=embeddings_input, checkpoint=checkpoint,
                                  targets=targets, components=components, per_position=components_per_position,
                                  intervene=intervene, conditions=conditions, forward_mode=forward,
                                  target_chunk=target_chunk)
    if output is not None:
        save_model(ir_model, output, force=force, reuse_weights=reuse_weights, inputs=sources)
    return ir.to_proto(ir_model)


def is_torch_module(model) -> bool:
    return type(model).__module__.startswith("torch") or any(
        c.__module__.startswith("torch.nn") for c in type(model).__mro__)
