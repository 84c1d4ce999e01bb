"""Faithfulness metrics (AttnLRP paper, Sec. 4.1): perturbation-curve areas (ABPC, AOPC), evidence
recovery, and `Results`, the curves of an evaluation with their summary, table and plot."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABELS = {"attnlrp": "AttnLRP", "cp-lrp": "CP-LRP", "gxi": "Input×Gradient", "ig": "Integrated Gradients",
          "rollout": "Attention rollout", "random": "Random"}
COLORS = {"attnlrp": "#d62728", "cp-lrp": "#ff7f0e", "gxi": "#1f77b4", "ig": "#2ca02c", "rollout": "#9467bd",
          "random": "#7f7f7f"}



def removal_counts(n: int, steps: int) -> np.ndarray:
    """How many of n features are removed at each of the steps + 1 points (fractions 0, 1/steps, …, 1)."""
    return np.round(np.linspace(0.0, 1.0, steps + 1) * n).astype(int)


def abpc(morf: np.ndarray, lerf: np.ndarray) -> float:
    """Area between the LeRF and MoRF curves over the removed fraction in [0, 1] (trapezoid rule)."""
    diff = np.asarray(lerf, np.float64) - np.asarray(morf, np.float64)
    x = np.linspace(0.0, 1.0, diff.shape[-1])
    return float(np.sum((diff[..., 1:] + diff[..., :-1]) * 0.5 * np.diff(x), axis=-1).mean())


def aopc(curve: np.ndarray) -> float:
    """Mean drop of the explained scalar along a perturbation curve: mean_k (s_0 − s_k)."""
    curve = np.asarray(curve, np.float64)
    return float((curve[..., :1] - curve).mean())


def orders(relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(MoRF, LeRF) feature orders; ties keep feature order (stable sort)."""
    morf = np.argsort(-relevance, kind="stable")
    lerf = np.argsort(relevance, kind="stable")
    return morf, lerf


def topk_recovery(relevance: np.ndarray, evidence) -> bool:
    """True when the k most relevant features (k = number of evidence features) are exactly the evidence."""
    evidence = set(int(e) for e in evidence)
    k = len(evidence)
    return set(np.argsort(-relevance, kind="stable")[:k].tolist()) == evidence


@dataclass
class Results:
    """Perturbation curves per method (examples × points), ABPC / AOPC, and optional evidence recovery."""

    name: str
    methods: list[str]
    morf: dict[str, np.ndarray]
    lerf: dict[str, np.ndarray]
    recovery: dict[str, float] = field(default_factory=dict)
    relevances: dict[str, list] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(next(iter(self.morf.values())))

    def abpc(self, method: str) -> float:
        return abpc(self.morf[method], self.lerf[method])

    def abpc_sem(self, method: str) -> float:
        diff = self.lerf[method] - self.morf[method]
        x = np.linspace(0, 1, diff.shape[1])
        per = np.sum((diff[:, 1:] + diff[:, :-1]) * 0.5 * np.diff(x), axis=1)
        return float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0

    def aopc_morf(self, method: str) -> float:
        return aopc(self.morf[method])

    def aopc_lerf(self, method: str) -> float:
        return aopc(self.lerf[method])

    def summary(self) -> dict:
        return {"model": self.name, "examples": self.n, "seconds": round(self.seconds, 1), "methods": {
            m: {"abpc": self.abpc(m), "abpc_sem": self.abpc_sem(m), "aopc_morf": self.aopc_morf(m),
                "aopc_lerf": self.aopc_lerf(m), **({"topk_recovery": self.recovery[m]} if m in self.recovery
                                                   else {})}
            for m in self.methods}}

    def markdown(self) -> str:
        head = "| method | ABPC ↑ | AOPC MoRF ↑ | AOPC LeRF ↓ |" + (" top-k evidence ↑ |" if self.recovery else "")
        sep = "|---|---:|---:|---:|" + ("---:|" if self.recovery else "")
        lines = [head, sep]
        for m in sorted(self.methods, key=lambda m: -self.abpc(m)):
            line = (f"| {LABELS.get(m, m)} | {self.abpc(m):.4f} ± {self.abpc_sem(m):.4f} | {self.aopc_morf(m):.4f} "
                    f"| {self.aopc_lerf(m):.4f} |")
            if self.recovery:
                line += f" {100 * self.recovery[m]:.1f} % |" if m in self.recovery else " – |"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, ylabel: str = "explained score", *, force: bool = False,
             inputs=()) -> Path:
        """The mean MoRF / LeRF curves per method as a PNG, written through lrpc.safeio."""
        import io

        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for m in self.methods:
            x = np.linspace(0, 1, self.morf[m].shape[1])
            color = COLORS.get(m)
            ax.plot(x, self.morf[m].mean(0), color=color, lw=2, label=f"{LABELS.get(m, m)} (ABPC {self.abpc(m):.3f})")
            ax.plot(x, self.lerf[m].mean(0), color=color, lw=1.2, ls="--")
        ax.set_xlabel("fraction of features removed")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{self.name}: MoRF (solid) and LeRF (dashed), n = {self.n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        from lrpc import safeio
        return safeio.write_bytes(path, buffer.getvalue(), force=force, inputs=inputs)
