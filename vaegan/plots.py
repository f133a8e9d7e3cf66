"""Loss curves for users without a tracker: every logged scalar of ``metrics.jsonl`` in one PNG.

Example:
    >>> plot_loss_curves("outputs/vaegan_mnist/metrics.jsonl", "outputs/vaegan_mnist/loss_curves.png")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["read_metrics", "group_metrics", "plot_loss_curves", "loss_curves_figure", "write_loss_curves"]

logger = logging.getLogger(__name__)

# Subplot order and titles; any other prefix gets a subplot of its own after these.
_GROUPS = {
    "g": "generator losses (g/)",
    "d": "discriminator losses (d/)",
    "d_logits": "discriminator outputs: mean logits (d/logits_*), accuracies (d/acc_*)",
    "weight": "loss weights (weight/, adaptive adversarial weight)",
    "grad_norm": "gradient norms before clipping (grad_norm/)",
    "lr": "learning rates (lr/)",
    "images_per_sec": "throughput (images/s)",
}
_SKIP = {"step", "epoch"}

Series = Dict[str, Tuple[List[int], List[float]]]


def read_metrics(path: Union[str, Path]) -> Series:
    """Read ``metrics.jsonl`` into ``{key: (steps, values)}``, sorted by step.

    A resumed run appends records for steps it replays; the latest record of a step wins. Lines that
    are not JSON (a run killed while writing) are skipped.
    """
    by_step: Dict[str, Dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, value in record.items():
            if key not in _SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_step.setdefault(key, {})[record["step"]] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in sorted(by_step.items())}


def group_metrics(series: Series) -> Dict[str, Series]:
    """Split series into subplot groups by key prefix (``g/``, ``d/``, ``weight/``, ...).

    Example:
        >>> sorted(group_metrics({"g/kl": ([1], [0.1]), "d/logits_real": ([1], [0.3])}))
        ['d_logits', 'g']
    """
    groups: Dict[str, Series] = {}
    for key, data in series.items():
        prefix = key.split("/", 1)[0] if "/" in key else key
        if key.startswith(("d/logits_", "d/acc_")):  # outputs, not losses: another scale
            prefix = "d_logits"
        elif key.endswith("/adaptive_weight"):  # a weight, not a loss
            prefix = "weight"
        groups.setdefault(prefix, {})[key] = data
    order = list(_GROUPS) + sorted(set(groups) - set(_GROUPS))
    return {name: groups[name] for name in order if name in groups}


def plot_loss_curves(metrics_path: Union[str, Path], out: Union[str, Path]) -> Path:
    """Draw every logged scalar, one subplot per group, into a PNG.

    Args:
        metrics_path: A run's ``metrics.jsonl``.
        out: The PNG to write.

    Returns:
        ``out`` as a Path.

    Raises:
        OSError: ``metrics_path`` cannot be read or ``out`` cannot be written.
        ValueError: the file holds no metrics.
    """
    fig = loss_curves_figure(metrics_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def loss_curves_figure(metrics_path: Union[str, Path]) -> Any:
    """The figure :func:`plot_loss_curves` saves (a ``matplotlib.figure.Figure``, one axis per group).

    Raises:
        OSError: ``metrics_path`` cannot be read. ValueError: it holds no metrics.
    """
    # Figure + the Agg canvas directly, not pyplot: no global state, no GUI backend, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_metrics(read_metrics(metrics_path))
    if not groups:
        raise ValueError(f"'{metrics_path}' holds no logged metrics.")
    height = 2.6 * len(groups)
    fig = Figure(figsize=(11, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, series) in zip(axes, groups.items()):
        drawn: Dict[Tuple, str] = {}  # a series equal to one already drawn (lr/d = lr/g): dashed, and said
        for i, (key, (steps, values)) in enumerate(series.items()):
            same = drawn.setdefault((tuple(steps), tuple(values)), key)
            twin = same != key
            ax.plot(steps, values, label=f"{key} (= {same})" if twin else key, linewidth=2.4 if twin else 1.2,
                    linestyle=(0, (4, 3)) if twin else "-", zorder=2 + i, marker="." if len(steps) < 20 else None)
        finite = [v for _, values in series.values() for v in values if math.isfinite(v)]
        # Loss terms span decades (a KL of 1e-3 next to a BCE of 0.2): log scale when it can apply.
        if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
            ax.set_yscale("log")
        ax.set_title(_GROUPS.get(name, name), fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1].set_xlabel("optimizer step")
    # Fixed margins (legends on the right) rather than constrained layout, which measures every
    # tick label again and takes seconds for a figure this size.
    fig.subplots_adjust(left=0.08, right=0.76, top=1 - 0.35 / height, bottom=0.5 / height, hspace=0.35)
    return fig


def write_loss_curves(output_dir: Union[str, Path]) -> Optional[Path]:
    """``<output_dir>/loss_curves.png`` from ``<output_dir>/metrics.jsonl``; never raises.

    Used at the end of training, where a plotting problem must not turn a finished run into a
    failed one: problems are logged as a warning and None is returned.
    """
    output_dir = Path(output_dir)
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    try:
        path = plot_loss_curves(metrics, output_dir / "loss_curves.png")
    except ImportError:
        logger.warning("matplotlib is not installed, so no loss_curves.png (pip install matplotlib).")
        return None
    except Exception as exc:  # noqa: BLE001 - the model and checkpoints are already written
        logger.warning("Could not draw the loss curves from %s (%s: %s).", metrics, type(exc).__name__, exc)
        return None
    logger.info("Loss curves written to %s", path)
    return path
