"""The plots of BENCHMARKS.md (PNG, matplotlib, imported when drawn): cost-model accuracy, runtime overhead,
plan quality and search speed, each from its results JSON (benchmarks/report.py writes the page around them)."""

from __future__ import annotations

from pathlib import Path


def plot_cost_accuracy(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, (pred, meas, unit, scale) in zip(
        axes,
        (
            ("predicted_s", "measured_s", "iteration time (ms)", 1e3),
            ("predicted_peak_bytes", "measured_peak_bytes", "peak memory per rank (MiB)", 2**-20),
        ),
    ):
        for (model, world), marker in zip(sorted({(r["model"], r["world"]) for r in rows}), "osD^v<>"):
            chosen = [r for r in rows if (r["model"], r["world"]) == (model, world)]
            if pred == "predicted_peak_bytes":  # one point per rank
                xs = [m * scale for r in chosen for m in r["measured_peak_bytes_per_rank"]]
                ys = [p * scale for r in chosen for p in r["predicted_peak_bytes_per_rank"]]
            else:
                xs, ys = [r[meas] * scale for r in chosen], [r[pred] * scale for r in chosen]
            ax.scatter(xs, ys, marker=marker, label=f"{model}, {world} procs", alpha=0.8)
        values = [v for line in ax.collections for v in line.get_offsets().flatten()]
        lo, hi = min(values) * 0.8, max(values) * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="exact")
        band = 0.10 if pred == "predicted_peak_bytes" else 0.25
        ax.fill_between(
            [lo, hi],
            [lo * (1 - band), hi * (1 - band)],
            [lo * (1 + band), hi * (1 + band)],
            color="grey",
            alpha=0.2,
            label=f"±{band:.0%}",
        )
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel(f"measured {unit}"), ax.set_ylabel(f"predicted {unit}")
        ax.legend(fontsize=8)
    s = data["summary"]
    fig.suptitle(
        f"Cost model: median |time error| {s['median_time_error']:.0%}, Spearman {s['spearman_time']:.2f}; "
        f"median |memory error| {s['median_memory_error']:.0%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runtime_overhead(datasets: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, ratios = [], []
    for data in datasets:
        for row in data["rows"]:
            labels.append(f"{row['strategy']}\n{row['world']} procs")
            ratios.append(row["ratio"])
    ax.bar(range(len(ratios)), ratios, color=["tab:green" if r <= 1.05 else "tab:red" for r in ratios])
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.05, color="tab:red", ls="--", lw=1, label="target 1.05")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("step time, ours / torch-native")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_plan_quality(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(data["rows"], key=lambda r: r["samples_per_s"])
    colors = {"uniform": "tab:blue", "searched": "tab:orange", "native": "tab:grey"}
    fig, ax = plt.subplots(figsize=(8, max(4, 0.25 * len(rows))))
    ax.barh(range(len(rows)), [r["samples_per_s"] for r in rows], color=[colors[r["kind"]] for r in rows])
    ax.set_yticks(range(len(rows)), [r["plan"] for r in rows], fontsize=7)
    ax.set_xlabel("measured samples/s")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=color, label=kind) for kind, color in colors.items()], loc="lower right")
    ax.set_title(f"{data['model']}, {data['world']} processes, global batch {data['global_batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search_speed(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, fixed, label) in zip(
        axes, (("layers", ("devices", 8), "layers (8 devices)"), ("devices", ("layers", 32), "devices (32 layers)"))
    ):
        chosen = [r for r in rows if r[fixed[0]] == fixed[1] and r["search_s"] is not None]
        ax.plot([r[key] for r in chosen], [r["search_s"] for r in chosen], "o-")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel(label), ax.set_ylabel("search wall time (s)")
    fig.suptitle("Search time (LLaMA-2-7B layer profile, A100 preset)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
