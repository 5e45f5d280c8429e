"""Pictures for people: training curves from a run's ``metrics.jsonl`` and attention heatmaps.
matplotlib is an optional extra (``pip install -e '.[plot]'``), imported only here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import DataError, MissingExtraError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("plots need matplotlib; install it with: pip install 'translate-rnn[plot]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """The train and dev records of a run's metrics.jsonl (a damaged last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics file; give a run directory made by `translate train`")
    train, dev = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves half a line
        (dev if record.get("kind") == "dev" else train).append(record)
    if not train and not dev:
        raise DataError(f"{path}: no metrics yet; train for at least one logging interval")
    return train, dev


def extra_dev_names(dev: list[dict]) -> list[str]:
    """The extra dev sets (``data.extra_dev``) in a run's dev records, by their ``NAME/bleu`` keys."""
    names = {}
    for record in dev:
        names.update((key.removesuffix("/bleu"), None) for key in record if key.endswith("/bleu"))
    return list(names)


def plot_training(run_dir: str | Path, output: str | Path) -> Path:
    """Train and dev loss, dev BLEU, and teacher forcing (the step schedule's ratio, the share of
    positions fed the model's choice and of those fed a token that is not gold) against steps."""
    plt = _pyplot()
    train, dev = read_metrics(run_dir)
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    loss_ax, bleu_ax, tf_ax = axes
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (with label smoothing)",
                     color="tab:blue", linewidth=1)
    if dev:
        loss_ax.plot([r["step"] for r in dev], [r["dev_loss"] for r in dev], "o-", label="dev loss",
                     color="tab:orange")
        bleu_ax.plot([r["step"] for r in dev], [r["dev_bleu"] for r in dev], "o-", color="tab:green")
        best = max(dev, key=lambda r: r["dev_bleu"])
        bleu_ax.annotate(f"best {best['dev_bleu']:.2f}", (best["step"], best["dev_bleu"]),
                         textcoords="offset points", xytext=(0, 8), ha="center")
        for name in extra_dev_names(dev):  # data.extra_dev: a curve each, in its own colour
            scored = [r for r in dev if f"{name}/bleu" in r]
            line, = bleu_ax.plot([r["step"] for r in scored], [r[f"{name}/bleu"] for r in scored], "s--",
                                 label=name)
            loss_ax.plot([r["step"] for r in scored], [r[f"{name}/loss"] for r in scored], "s--",
                         color=line.get_color(), label=f"{name} loss")
        if extra_dev_names(dev):
            bleu_ax.lines[0].set_label("dev")
            bleu_ax.legend(fontsize="small")
    loss_ax.set_ylabel("loss per token")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    bleu_ax.set_ylabel("dev BLEU")  # (and the extra dev sets')
    bleu_ax.margins(y=0.15)  # room for the "best" label
    bleu_ax.grid(alpha=0.3)
    steps = [r["step"] for r in train]
    tf_ax.plot(steps, [r.get("tf_ratio", 1.0) for r in train], color="tab:purple", label="schedule's gold ratio")
    if any("fed_model" in r for r in train):  # runs before these were logged have only the ratio
        tf_ax.plot(steps, [r.get("fed_model", 0.0) for r in train], color="tab:red", linewidth=1,
                   label="fed the model's choice")
        tf_ax.plot(steps, [r.get("fed_not_gold", 0.0) for r in train], color="tab:gray", linewidth=1,
                   label="fed a token that is not gold")
    tf_ax.legend(loc="center right", fontsize="small")
    tf_ax.set_ylabel("share of positions")
    tf_ax.set_ylim(0, 1.05)
    tf_ax.set_xlabel("step")
    tf_ax.grid(alpha=0.3)
    fig.suptitle(f"training run {Path(run_dir).resolve().name}")
    fig.tight_layout()
    return _save(fig, plt, output)


def plot_attention(src_pieces: Sequence[str], tgt_pieces: Sequence[str], weights, output: str | Path,
                   title: str = "") -> Path:
    """A heatmap of attention weights (len(tgt_pieces), len(src_pieces)), pieces on the axes."""
    plt = _pyplot()
    values = [[float(w) for w in row] for row in weights]
    width = max(4.0, 0.45 * len(src_pieces) + 2)
    height = max(3.0, 0.4 * len(tgt_pieces) + 1.5)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(src_pieces)), list(src_pieces), rotation=60, ha="right")
    ax.set_yticks(range(len(tgt_pieces)), list(tgt_pieces))
    ax.set_xlabel("source pieces")
    ax.set_ylabel("output pieces")
    fig.colorbar(image, ax=ax, fraction=0.04)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, output)


def _save(fig, plt, output: str | Path) -> Path:
    output = Path(output)
    try:
        fig.savefig(output, dpi=120)
    except OSError as exc:
        raise DataError(f"cannot write {output}: {exc.strerror}; choose a writable path") from None
    finally:
        plt.close(fig)
    return output
