"""The demo's figures as PNG files: reward curves and the reward–KL frontier (matplotlib,
imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_curves", "plot_frontier", "plot_reward_curve"]


def _figure(height: float):
    """A figure that is not registered with pyplot: writing a PNG never switches the caller's
    backend (a notebook's inline plots keep working) and leaves no open figure behind."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, height))
    return fig, fig.subplots()


def plot_reward_curve(
    curves: dict[str, dict[str, Sequence[float]]], path: str, *, title: str = "PPO: gold reward"
) -> None:
    """One line (± 1 standard error band) per run.

    ``curves``: ``{label: {"gold_reward": [T], "gold_reward_se": [T]}}``; writes a PNG to ``path``.
    """
    fig, ax = _figure(4.0)
    for label, curve in curves.items():
        mean = np.asarray(curve["gold_reward"], dtype=np.float64)
        se = np.asarray(curve.get("gold_reward_se", np.zeros_like(mean)), dtype=np.float64)
        steps = np.arange(len(mean))
        ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("mean gold reward of samples")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_frontier(points: Sequence[dict[str, Any]], path: str, *,
                  title: str = "Reward–KL frontier") -> None:
    """Gold reward against KL(π‖π_SFT), one marker style per method, each point annotated with
    its swept value (or its own ``"label"``); writes a PNG to ``path``.

    ``points``: ``[{"method", "param", "value", "gold_reward", "kl_to_sft"}]``, optionally
    ``"label"`` (the annotation text, e.g. ``"BoN n=4"``) and ``"kl_closed_form": True`` (the
    KL is analytic, not estimated: the method's line is dashed).
    """
    fig, ax = _figure(4.4)
    methods = list(dict.fromkeys(p["method"] for p in points))
    markers = "osD^v<>P*Xhd"
    if len(methods) > len(markers):
        raise ValueError(f"at most {len(markers)} methods per plot, got {len(methods)}")
    for marker, method in zip(markers, methods):
        group = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl_to_sft"])
        kls = [p["kl_to_sft"] for p in group]
        golds = [p["gold_reward"] for p in group]
        line = "--" if all(p.get("kl_closed_form") for p in group) else "-"
        ax.plot(kls, golds, marker=marker, label=method, linestyle=line if len(group) > 1 else "")
        for p in group:
            label = p.get("label") or (f"{p['param']}={p['value']:g}" if p.get("param") else "")
            if label:
                ax.annotate(label, (p["kl_to_sft"], p["gold_reward"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(π ‖ π_SFT)  [nats per completion]")
    ax.set_ylabel("mean gold reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
                baseline: tuple[str, float] | None = None, xlabel: str = "", ylabel: str = "",
                title: str = "") -> None:
    """One line per ``{label: (x, y)}`` (markers at the points), an optional horizontal
    ``(label, value)`` baseline; writes a PNG to ``path``."""
    fig, ax = _figure(4.0)
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline[1], color="grey", ls="--", label=baseline[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)

