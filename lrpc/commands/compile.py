"""lrpc compile: turn a model into an explainer."""

from __future__ import annotations

from lrpc import validate
from lrpc.causal_blocks import BLOCKS as CAUSAL_BLOCKS
from lrpc.causal_blocks import MIN_TOKENS as CAUSAL_MIN_TOKENS
from lrpc.commands.common import add_force_option, add_rule_options, model_source, rule_options
from lrpc.k_chunks import CHUNK as TARGET_CHUNK

HELP = "turn a model into an explainer"
EXAMPLES = """examples:
  lrpc compile model.onnx -o explainer.onnx                 # AttnLRP explainer of the first output
  lrpc compile model.onnx -o gxi.onnx --preset gxi          # plain Input×Gradient
  lrpc compile model.onnx -o e.onnx --output logits --attribute input_ids
  lrpc compile model.onnx -o e.onnx --reuse-weights         # reference model.onnx.data instead of copying it
  lrpc compile model.onnx -o e.onnx --components mlp,heads --intervene mlp   # unit relevance, ablation inputs
"""


def add_arguments(p) -> None:
    p.add_argument("model", help="ONNX file (with its .data file beside it) or a local Hugging Face model folder")
    p.add_argument("-o", "--out", required=True, help="where to write the explainer (.onnx)")
    add_rule_options(p)
    p.add_argument("--output", metavar="NAME", help="model output to explain (default: the first)")
    p.add_argument("--seed", default="target", choices=["target", "vector"],
                   help="target: explain y[target] (input lrp_target); vector: explain Σ seed·y (input lrp_seed)")
    p.add_argument("--targets", metavar="K|dynamic", help="explain K targets per input row in one run: "
                   "lrp_target / lrp_position become [batch, K] and each relevance.<name> gains a K axis after "
                   "batch (dynamic: K chosen per run)")
    p.add_argument("--target-chunk", metavar="C", type=int, default=TARGET_CHUNK, help="with --targets: run the "
                   "relevance pass in an in-graph loop over chunks of at most C targets after one forward (faster "
                   f"and smaller than all K at once); 0: no loop (default {TARGET_CHUNK})")
    p.add_argument("--latent", metavar="REGEX", help="also output relevance.<tensor> for matching tensors")
    p.add_argument("--components-per-position", action="store_true", help="relevance.<component>.<layer> per "
                   "position ([batch, positions, units]) instead of summed over positions")
    p.add_argument("--intervene", metavar="mlp,heads,residual", help="add optional inputs "
                   "lrp_scale.<component>.<layer> (one factor per unit, default 1) that scale the units in the "
                   "forward: 0 ablates a unit; the relevance is that of the scaled model")
    p.add_argument("--conditions", metavar="mlp,heads,residual", help="add optional inputs "
                   "lrp_mask.<component>.<layer> (one factor per unit on its relevance, default 1) and "
                   "lrp_bypass.<component>.<layer> (a factor on the relevance bypassing it, default 1): a one-hot "
                   "mask with bypass 0 gives CRP's conditional heatmap of that unit")
    p.add_argument("--embeddings-input", action="store_true", help="take the embedding lookup's output as an "
                   "extra float input inputs_embeds.<ids> instead of looking it up (for perturbation / path "
                   "methods); relevance is still relevance.<ids>")
    p.add_argument("--task", help="task for a Hugging Face folder (causal-lm, sequence-classification, "
                   "feature-extraction, sentence-similarity, image-classification, seq2seq-lm)")
    p.add_argument("--allow-random-head", action="store_true", help="compile a Hugging Face folder for a --task "
                   "whose head its checkpoint lacks (transformers initialises it at random; refused otherwise)")
    add_force_option(p, "-o (and its .data file)")
    p.add_argument("--checkpoint", metavar="auto|N", help="rematerialise forward segments of N layers (auto: √L) "
                   "during the relevance pass: memory grows like √layers for one extra forward")
    p.add_argument("--forward", choices=validate.FORWARD_MODES, default="auto", help="where the outputs come "
                   "from: copy = an untouched copy of the forward, bit for bit the model's at every onnxruntime "
                   "level (one more forward per run); shared = the forward the relevance reads (float rounding "
                   "off where onnxruntime fuses less); auto (default) = copy for quantized and float16 models")
    p.add_argument("--causal-blocks", metavar="N", type=int, default=CAUSAL_BLOCKS, help="also compile causal "
                   "self-attention cut into N query-row blocks that skip the masked upper triangle (about (N+1)/2N "
                   "of its work), used per run when the masks allow it and the input is long enough "
                   f"(--causal-min-tokens); 0: off (default {CAUSAL_BLOCKS})")
    p.add_argument("--causal-min-tokens", metavar="T", type=int, default=CAUSAL_MIN_TOKENS, help="shortest input "
                   f"that runs the blocked graph (default {CAUSAL_MIN_TOKENS}: below it the blocks' extra kernels "
                   "cost more than they save)")
    p.add_argument("--reuse-weights", action="store_true", help="reference the model's external-data weights "
                   "file from the explainer instead of copying it (-o must be in that file's folder or above)")


def run(args) -> int:
    import lrpc
    from lrpc import safeio
    from lrpc.loading import check_writable
    rule_options(args)  # refused before a model is exported on the way
    check_writable(args.out, args.force, safeio.input_files(args.model))
    model = model_source(args.model, args)
    lrpc.compile(model, preset=args.preset, output=args.out, output_name=args.output, attribute=args.attribute,
                 seed=args.seed, latent=args.latent, force=args.force, epsilon=args.epsilon,
                 gamma_linear=args.gamma_linear, gamma_conv=args.gamma_conv, rule_nodes=args.rule_nodes,
                 embeddings_input=args.embeddings_input, reuse_weights=args.reuse_weights,
                 checkpoint=args.checkpoint, targets=args.targets, components=args.components,
                 components_per_position=args.components_per_position, intervene=args.intervene,
                 conditions=args.conditions, forward=args.forward, causal_blocks=args.causal_blocks,
                 causal_min_tokens=args.causal_min_tokens, target_chunk=args.target_chunk)
    print(f"wrote {args.out} (preset {args.preset})")
    return 0
