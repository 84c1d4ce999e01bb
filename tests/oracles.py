"""Independent oracles: torch autograd Input×Gradient on the original PyTorch modules."""

from __future__ import annotations

import numpy as np
import torch


def explained_scalar(y: torch.Tensor, target, position=None) -> torch.Tensor:
    rows = torch.arange(y.shape[0])
    if y.dim() == 3:
        return y[rows, torch.as_tensor(position), torch.as_tensor(target)].sum()
    return y[rows, torch.as_tensor(target)].sum()


def input_x_gradient(module, inputs: dict[str, torch.Tensor], attributed: str, target, position=None) -> np.ndarray:
    """Σ_hidden E ⊙ ∂s/∂E at the input embedding output for token ids; x ⊙ ∂s/∂x for float inputs."""
    inputs = dict(inputs)
    captured = {}
    if inputs[attributed].is_floating_point():
        x = inputs[attributed].detach().clone().requires_grad_(True)
        inputs[attributed] = x
        y = module(**inputs)
        explained_scalar(y, target, position).backward()
        return (x * x.grad).detach().numpy()
    table = module.hf_model.get_input_embeddings().weight
    ids = inputs[attributed]

    def keep(_mod, args, output):  # an encoder–decoder reads the one table twice: keep the lookup of `ids`
        if args[0].shape == ids.shape and torch.equal(args[0], ids):
            output.retain_grad()
            captured["E"] = output
    handles = [m.register_forward_hook(keep) for m in module.modules()  # every module that shares the table
               if isinstance(m, torch.nn.Embedding) and m.weight is table]
    try:
        y = module(**inputs)
        explained_scalar(y, target, position).backward()
    finally:
        for handle in handles:
            handle.remove()
    E = captured["E"]
    return (E * E.grad).sum(-1).detach().numpy()


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
