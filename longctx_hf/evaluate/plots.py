"""The two pictures of an evaluation, drawn from a results dict (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations


def _length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run) -> str:
    return "none (unextended)" if run["method"] == "none" else f"{run['method']} ×{run['factor']:g}"


def ppl_vs_length(results: dict, path) -> None:
    """One line per method plus the sliding-window baseline; the pretrained length marked."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullLocator

    runs = [run for run in results["runs"] if run.get("perplexity")]
    window = results["pretrained_length"]
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = results["baseline_perplexity"]
    ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], "k--", marker="s",
            label=f"baseline: unextended, {window}-token sliding window")
    ax.annotate(f"{rows[-1]['ppl']:.2f}", (rows[-1]["length"], rows[-1]["ppl"]), textcoords="offset points",
                xytext=(-8, 0), ha="right", va="center", fontsize=8)
    labels = []
    for run in runs:
        line, = ax.plot([r["length"] for r in run["perplexity"]], [r["ppl"] for r in run["perplexity"]],
                        marker="o", label=_label(run))
        labels.append((run["perplexity"][-1], line.get_color()))
    lift, previous = 0, None
    for last, color in sorted(labels, key=lambda item: item[0]["ppl"]):  # values at the longest length
        close = previous is not None and last["ppl"] < previous * 1.06  # would overlap: stack upwards
        lift = lift + 10 if close else 0
        previous = last["ppl"]
        ax.annotate(f"{last['ppl']:.2f}", (last["length"], last["ppl"]), textcoords="offset points",
                    xytext=(8, lift), va="center", fontsize=8, color=color)
    lengths = [r["length"] for r in rows]
    if min(lengths) <= window <= max(lengths):
        ax.axvline(window, color="grey", linestyle=":", label=f"pretrained length ({window})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(lengths, [_length(n) for n in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(lengths) / 1.3, max(lengths) * 1.3)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"perplexity of the same last {results['tokens_scored']} tokens (log scale)")
    ax.set_title(f"{results['model']}: perplexity vs context length (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def passkey_heatmap(results: dict, path) -> None:
    """One panel per method: depth (rows) x length (columns), colour = accuracy, cells annotated correct/trials."""
    plt = _pyplot()
    runs = [run for run in results["runs"] if run.get("passkey")]
    lengths = sorted({cell["length"] for run in runs for cell in run["passkey"]})
    depths = sorted({cell["depth"] for run in runs for cell in run["passkey"]})
    fig, axes = plt.subplots(1, len(runs), figsize=(1.5 + (1.2 + 0.9 * len(lengths)) * len(runs),
                                                    2.0 + 0.6 * len(depths)),
                             squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, run in zip(axes[0], runs):
        cells = {(c["depth"], c["length"]): c for c in run["passkey"]}
        # cells a run did not measure (e.g. results combined from several runs) stay blank, marked "not run"
        grid = [[cells[(d, n)]["accuracy"] if (d, n) in cells else float("nan") for n in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cell = cells.get((d, n))
                if cell is None:
                    ax.text(j, i, "not run", ha="center", va="center", fontsize=8, color="grey")
                    continue
                dark = not 0.25 <= cell["accuracy"] <= 0.75
                ax.text(j, i, f"{cell['correct']}/{cell['trials']}\n{cell['accuracy']:.0%}", ha="center",
                        va="center", fontsize=9, color="white" if dark else "black")
        ax.set_xticks(range(len(lengths)), [_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(_label(run), fontsize=10)
    axes[0][0].set_ylabel("key depth in the prompt")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy (correct / trials)", fraction=0.05)
    fig.suptitle(f"{results['model']}: passkey retrieval (greedy decoding)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ruler_heatmap(results: dict, path) -> None:
    """One panel per method: task (rows, the mean over tasks last) x length (columns), colour = score 0-100."""
    plt = _pyplot()
    runs = [run for run in results["runs"] if run.get("ruler")]
    lengths = sorted({cell["length"] for run in runs for cell in run["ruler"]})
    tasks = results["ruler"]["tasks"]
    rows = tasks + ["mean"]
    fig, axes = plt.subplots(1, len(runs), figsize=(2.5 + (0.8 + 0.8 * len(lengths)) * len(runs),
                                                    1.5 + 0.38 * len(rows)),
                             squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, run in zip(axes[0], runs):
        cells = {(c["task"], c["length"]): c["score"] for c in run["ruler"]}
        means = results.get("ruler_summary", {}).get("methods", {}).get(run["method"], {}).get("average", {})
        grid = [[cells.get((task, n), float("nan")) for n in lengths] for task in tasks]
        grid.append([means.get(str(n), float("nan")) for n in lengths])
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
        for i, row in enumerate(grid):
            for j, score in enumerate(row):
                text = "not run" if score != score else f"{score:.0f}"
                dark = score == score and not 25 <= score <= 75
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="grey" if score != score else ("white" if dark else "black"),
                        fontweight="bold" if i == len(tasks) else "normal")
        ax.axhline(len(tasks) - 0.5, color="black", linewidth=1)
        ax.set_xticks(range(len(lengths)), [_length(n) for n in lengths])
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(_label(run), fontsize=10)
    fig.supxlabel("prompt + answer length (tokens)", fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), label="score (RULER, 0-100)", fraction=0.05)
    fig.suptitle(f"{results['model']}: RULER tasks ({results['ruler']['samples']} samples per cell, greedy)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
