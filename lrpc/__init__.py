"""lrpc: compile a transformer (ONNX or torch) into an ONNX explainer that computes AttnLRP relevance."""

__version__ = "0.1.0"

from lrpc.errors import LrpcError  # noqa: E402
from lrpc.compiler import compile, plan_model  # noqa: E402,A004
from lrpc.runtime import Explainer, Explanation  # noqa: E402
from lrpc.attributor import Attributor, Similarity, explain  # noqa: E402
from lrpc.results import Attribution, Attributions, Generation, load_results  # noqa: E402
from lrpc.atlas import Atlas  # noqa: E402

LRP = Attributor  # Captum's spelling: lrpc.LRP(model).attribute(inputs, target=...)

__all__ = ["compile", "plan_model", "Explainer", "Explanation", "LrpcError", "__version__",
           "explain", "Attributor", "Similarity", "LRP", "Attribution", "Attributions", "Generation",
           "load_results", "Atlas"]
