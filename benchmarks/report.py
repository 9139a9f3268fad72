"""Draw the plots of benchmarks/results/*.json (PNG, matplotlib) and write BENCHMARKS.md from them.

    python benchmarks/report.py            # after the benchmarks have run

Every figure in BENCHMARKS.md comes from a results JSON, next to the command that made it and the machine
and load it was taken under; ``--search-speed FILE`` adds the search-scaling output (a text file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, RESULTS
from benchmarks.report_plots import plot_cost_accuracy, plot_plan_quality, plot_runtime_overhead, plot_search_speed


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def search_speed_section(data: dict, folder: Path, rel) -> list[str]:
    """Section 4 from benchmarks/search_speed.py's JSON."""
    parts = ["## 4. Search scaling", "", f"`{data.get('command', 'python benchmarks/search_speed.py')}`", ""]
    fixture = data.get("fixture")
    if fixture:
        engine = fixture["galvatron_engine"]
        parts += [
            "Galvatron's LLaMA-2-7B case (1 × 8 GPUs, 36 GB, bf16, global batch 16): search "
            f"**{fixture['search_s']:.2f} s** "
            f"(Galvatron's engine: {engine['search_s']:.0f} s); our plan **{fixture['ours_samples_per_s']:.3f} "
            "samples/s**, "
            f"Galvatron's strategy file {fixture['galvatron_plan_samples_per_s_our_model']:.3f} samples/s, both under "
            "our cost "
            f"model (Galvatron's own estimate of its plan: {engine['samples_per_s']} samples/s).",
            "",
        ]
    scale = data.get("scale")
    if scale:
        took = "over 600 s" if scale["search_s"] is None else f"{scale['search_s']:.1f} s"
        parts += [f"Scale case ({scale['layers']} layers, {scale['devices']} devices, batch 256..1024): {took}.", ""]
    sweep = data.get("sweep")
    if sweep:
        plot = folder / "search_speed.png"
        plot_search_speed(sweep, plot)
        parts += ["| layers | devices | search s | outcome |", "| --- | --- | --- | --- |"]
        over = f"> {data['cap_s']:.0f} (cap)" if "cap_s" in data else "> cap"
        parts += [
            f"| {r['layers']} | {r['devices']} | {over if r['search_s'] is None else format(r['search_s'], '.2f')} "
            f"| {r.get('outcome', '')} |"
            for r in sweep
        ]
        parts += ["", f"![search time]({rel(plot)})", ""]
    return parts


def precision_and_compile_section(data: dict) -> list[str]:
    """Step times of eager and compiled layers, fp32 and bf16, per strategy (benchmarks/precision_and_compile.py)."""
    from benchmarks.precision_and_compile import RATIOS, VARIANTS

    header = ["strategy", "procs"] + [f"{name} ms" for name in VARIANTS] + [label for label, _, _ in RATIOS]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in data["rows"]:
        cells = [row["strategy"], str(row["procs"])] + [f"{row[name]:.1f}" for name in VARIANTS]
        lines.append("| " + " | ".join(cells + [f"{row[label]:.3f}" for label, _, _ in RATIOS]) + " |")
    return [
        "## 2b. Compiled layers and bf16",
        "",
        f"`{data['command']}` — {_environment(data)}",
        "",
        "Ratios are paired: the median over the rounds of each round's ratio, the four variants of a strategy "
        f"timed one after another in rotating order ({data.get('rounds', '-')} rounds, one step each), in one "
        "run: single-run figures on a machine whose timings drift by tens of percent (see the top). This "
        "CPU computes bf16 matmuls faster than fp32, which GPUs do too but by other factors, and inductor's "
        "CPU code is not its GPU code: the figures describe this machine; `benchmarks/gpu_check.py` takes the "
        "GPU ones.",
        "",
        *lines,
        "",
    ]


def _environment(data: dict) -> str:
    env = data["environment"]
    load = env.get("load_average_1_5_15_min") or env.get("load_average_at_start")
    where = env.get("cuda") or f"CPU ({env['cpus']} cores, {env['backend']})"
    return f"written {env['time']}, {where}, torch {env['torch']}" + (
        f", load average over the last 1/5/15 min {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}" if load else ""
    )


def _step_overheads(data: dict) -> str:
    hardware = data["profile"]["hardware"]
    op_s, cast_s = hardware.get("op_overhead_s", 0.0), hardware.get("autocast_cast_s_per_param", 0.0)
    if not op_s:
        return " (FLOPs only: no per-operator time in the profile)"
    return f", {op_s * 1e6:.1f} µs per dispatched operator, {cast_s * 1e9:.2f} ns per parameter autocast casts"


def out_of_sample_section(data: dict, quality_oos: dict | None, one_per_core: dict | None = None) -> list[str]:
    """The headline: cost-model accuracy out of sample (benchmarks/cost_accuracy_oos.py), per strategy kind, at 4
    processes and (``one_per_core``) at 2."""
    parts = oos_figures(data, "## 0. Cost-model accuracy out of sample (headline)")
    if one_per_core:
        parts += oos_figures(
            one_per_core,
            "### 0b. The same at 2 processes: one per core",
            "Four processes on this machine's 2 cores share them, twice oversubscribed: every blocking collective and "
            "pipeline hop also waits for the scheduler to run the peer, which no probe reproduces exactly (section 0's "
            "notes). Two processes have a core each, as ranks on GPUs have a device each, which leaves the cost "
            "model's own error in view.",
        )
    return parts + oos_extras(data, quality_oos)


def oos_figures(data: dict, title: str, note: str = "") -> list[str]:
    """One out-of-sample run: its command, protocol, figures against the targets, and its tables."""
    s, t = data["summary"], data["targets"]
    loads = data.get("load_during_measurement") or {}
    load = ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}/{v[2]:.1f}" for k, v in loads.items() if v)
    flops = data.get("priced_flops_per_s", {})
    mark = lambda value, target: f"**{value:.1%}**" + ("" if value <= target else " (missed)")  # noqa: E731
    parts = [
        title,
        "",
        *([note, ""] if note else []),
        f"Profiled and measured by `{data.get('measured_command') or data['command']}` (load average 1/5/15 min "
        f"{load} of the measurement launches); priced by `{data['command']}` — {_environment(data)}.",
        "",
        "Protocol: " + " ".join(data["protocol"].split()),
        "",
        f"Priced throughput per process at {data['world']} processes: "
        + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in flops.items())
        + _step_overheads(data)
        + f"; {s['plans']} plans of LLaMA and BERT, global batch {data['global_batch']}.",
        "",
        f"Median |time error| {mark(s['median_time_error'], t['median_time_error'])} (target ≤ 10 %), worst "
        f"{mark(s['worst_time_error'], t['worst_time_error'])} (≤ 25 %); Spearman of predicted and measured time "
        f"**{s['spearman_time']:.3f}**; memory per rank: median |error| **{s['median_memory_error']:.1%}**, worst "
        f"{mark(s['worst_memory_error'], t['memory_error'])} (≤ 10 %).",
        "",
        data["kind_table"],
        "",
        data["table"],
        "",
    ]
    if data.get("failed"):
        parts += ["Plans that failed (left out of the figures):", ""]
        parts += [f"- {f['model']} {f['dtype']} {f['plan']}: {f['error']}" for f in data["failed"]] + [""]
    return parts


def oos_extras(data: dict, quality_oos: dict | None) -> list[str]:
    """What goes with the 4-process run: an earlier run, the stored plan-quality sweep, plan quality out of
    sample."""
    parts: list[str] = []
    again = _load(RESULTS, "cost_accuracy_oos_run2")
    if again:
        r = again["summary"]
        parts += [
            f"An earlier run (`{again.get('measured_command') or again['command']}`, {_environment(again)}; "
            "taken beside the test suite and priced by the code of its day, which its memory measurements "
            "also predate): median "
            f"|time error| **{r['median_time_error']:.1%}**, worst **{r['worst_time_error']:.1%}**, Spearman "
            f"**{r['spearman_time']:.3f}**; memory median **{r['median_memory_error']:.1%}**, worst "
            f"**{r['worst_memory_error']:.1%}** (benchmarks/results/cost_accuracy_oos_run2.json).",
            "",
        ]
    pq = data.get("plan_quality_w4")
    if pq:
        parts += [
            f"The stored plan-quality sweep (`{pq['file']}`, written {pq['written']}: LLaMA at 4 processes, "
            "priced with the stored hardware profile and LLaMA's stored layer profile, each plan measured once) "
            f"reads, as predicted against measured step time: median |error| **{pq['median_time_error']:.1%}**, "
            f"worst **{pq['worst_time_error']:.1%}**, Spearman **{pq['spearman_time']:.3f}** over {pq['plans']} "
            "plans; as predicted against measured samples/s, median "
            f"{pq.get('median_throughput_error', float('nan')):.1%}, "
            f"worst {pq.get('worst_throughput_error', float('nan')):.1%}. "
            "Out of sample in time (a profile of another day) though not in model: it misses the time targets too.",
            "",
        ]
    if quality_oos:
        q = quality_oos["summary"]
        parts += [
            f"Plan quality out of sample (`{quality_oos['command']}` — {_environment(quality_oos)}): the search, "
            f"priced with these profiles, chose {q['searched_description']}; side by side "
            f"({q.get('side_by_side_rounds', '-')} alternated rounds) it ran at **{q['ratio_to_best_plan']:.3f}** × "
            f"the best measured of {sum(1 for r in quality_oos['rows'] if r['kind'] == 'uniform')} uniform plans "
            f"({q['best_measured_plan']}; target ≥ 0.95) and **{(q['ratio_to_best_native'] or 0):.3f}** × the best "
            f"torch-native baseline ({q['best_native']}). In the sweep (each plan measured once, minutes apart) it "
            f"read {q.get('sweep_ratio_to_best_plan', float('nan')):.3f} × the best. Section 3b lists the sweep.",
            "",
        ]
    return parts


def write_markdown(folder: Path, out: Path, search_speed: str | None, notes: str | None = None) -> str:
    cost = _load(folder, "cost_accuracy")
    overheads = [d for d in (_load(folder, f"runtime_overhead_w{w}") for w in (2, 4, 8)) if d]
    quality = [d for d in (_load(folder, f"plan_quality_w{w}") for w in (2, 4, 8)) if d]
    rel = lambda p: os.path.relpath(p, out.parent).replace(os.sep, "/")  # noqa: E731
    parts = [
        "# Benchmarks",
        "",
        "Latest figures; each section names the command that made it, the machine and its load. "
        "Regenerate this file with `python benchmarks/report.py` after running the benchmarks. "
        "Timing targets are ratios measured side by side in one run; none is asserted in the test suite.",
        "",
    ]
    if notes:
        parts += [notes.strip(), ""]
    oos = _load(folder, "cost_accuracy_oos")
    quality_oos = _load(folder, "plan_quality_w4_oos")
    if oos:
        parts += out_of_sample_section(oos, quality_oos, _load(folder, "cost_accuracy_oos_w2"))
    if cost:
        plot = folder / "cost_accuracy.png"
        plot_cost_accuracy(cost, plot)
        s = cost["summary"]
        measured = ""
        if cost.get("measured_by"):
            source = _load(folder, Path(cost["measured_by"]).stem) or {}
            measured = (
                f" — pricing the measurements of `{source.get('command', cost['measured_by'])}` "
                f"({_environment(source)})"
                if source
                else f" — pricing the measurements in {cost['measured_by']}"
            )
        parts += [
            "## 1. Cost-model accuracy in sample",
            "",
            "In sample: the profiles are taken in the same launch, at the same process counts, TP degrees and "
            "batch sizes as the plans they price, and the terms were fitted on such runs. Section 0 is the "
            "out-of-sample figure.",
            "",
            f"`{cost['command']}`{measured}",
            "",
            f"{s['plans']} plans. Median |time error| **{s['median_time_error']:.1%}** (target ≤ 10 %), worst "
            f"**{s['worst_time_error']:.1%}** (≤ 25 %); Spearman rank correlation of predicted and measured time "
            f"**{s['spearman_time']:.3f}** (≥ 0.9); memory per rank: median |error| "
            f"**{s['median_memory_error']:.1%}**, "
            f"worst **{s['worst_memory_error']:.1%}** (≤ 10 %).",
            "",
            f"![cost model accuracy]({rel(plot)})",
            "",
            cost["table"],
            "",
            f"MFU against {cost['peak_source']}.",
            "",
        ]
        if cost.get("failed"):
            parts += ["Plans that failed to lower (left out of the figures):", ""]
            parts += [f"- {f['model']}, {f['world']} processes, {f['plan']}: {f['error']}" for f in cost["failed"]] + []
    if overheads:
        plot = folder / "runtime_overhead.png"
        plot_runtime_overhead(overheads, plot)
        parts += ["## 2. Runtime overhead against torch-native parallelism", ""]
        for data in overheads:
            parts += [f"`{data['command']}` — {_environment(data)}", "", data["table"], ""]
        parts += [f"![runtime overhead]({rel(plot)})", "", f"MFU against {overheads[0]['peak_source']}.", ""]
        parts += [
            "**The tp rows are not like for like.** Our lowering runs the embedding and the head data-parallel "
            "on the stage's ranks, each on its share of the batch; the native DTensor baseline "
            "(`parallelize_module`) replicates them and runs them on the whole batch on every rank, so it does "
            "more work, and ours/native below 1 there measures that difference, not lower overhead.",
            "",
        ]
    precision = _load(folder, "precision_and_compile_w2")
    if precision:
        parts += precision_and_compile_section(precision)
    for data in quality:
        plot = folder / f"plan_quality_w{data['world']}.png"
        plot_plan_quality(data, plot)
        s = data["summary"]
        parts += [
            f"## 3. Plan quality ({data['world']} processes)",
            "",
            f"`{data['command']}` — {_environment(data)}",
            "",
            f"Searched plan: {s['searched_description']}. Measured side by side with the best measured plan "
            f"({s.get('best_measured_plan', '-')}) and the best torch-native baseline ({s.get('best_native', '-')}), "
            f"{s.get('side_by_side_rounds', '-')} alternated rounds: **{s['searched_samples_per_s']:.2f} samples/s** = "
            f"**{s['ratio_to_best_plan']:.3f}** × the best measured plan (target ≥ 0.95) and "
            f"**{(s['ratio_to_best_native'] or 0):.3f}** × the best torch-native baseline (target ≥ 1). "
            f"The sweep below measures each plan once, minutes apart; there the searched plan read "
            f"{s.get('sweep_ratio_to_best_plan', float('nan')):.3f} × the best.",
            "",
            f"![plan quality]({rel(plot)})",
            "",
            data["table"],
            "",
        ]
    if quality_oos:
        s = quality_oos["summary"]
        parts += [
            "## 3b. Plan quality out of sample (4 processes)",
            "",
            f"`{quality_oos['command']}` — {_environment(quality_oos)}",
            "",
            f"Priced with {quality_oos.get('profiles')}. Searched plan: {s['searched_description']}: side by side "
            f"**{s['ratio_to_best_plan']:.3f}** × the best measured plan ({s['best_measured_plan']}), "
            f"**{(s['ratio_to_best_native'] or 0):.3f}** × the best native baseline ({s['best_native']}); in the "
            f"sweep {s.get('sweep_ratio_to_best_plan', float('nan')):.3f}. The best uniform plan by prediction: "
            f"{s.get('best_uniform_by_prediction')}. Predicted against measured step time over the sweep: median "
            f"|error| {s.get('sweep_median_time_error', float('nan')):.1%}, worst "
            f"{s.get('sweep_worst_time_error', float('nan')):.1%}, "
            f"Spearman {s.get('sweep_spearman_time', float('nan')):.3f}.",
            "",
            quality_oos["table"],
            "",
        ]
    speed = _load(folder, "search_speed")
    if speed:
        parts += search_speed_section(speed, folder, rel)
    elif search_speed:
        parts += ["## 4. Search scaling", "", search_speed.strip(), ""]
    grid = folder / "grid_tp.md"  # written by hand from grid_tp.py's results: its tables need their explanations
    parts += [
        "## 5. Throughput and MFU",
        "",
        "Every table above reports samples/s and model FLOPs utilisation: graph-counted forward + backward FLOPs "
        "per step (recomputation not counted), over the step time and the summed peak of the devices from the "
        "cluster preset (GPUs: the datasheet dense peak of the training dtype; on CPU the preset's nominal "
        "100 GFLOP/s per process, so CPU MFU figures only compare runs with each other).",
        "",
    ]
    if grid.exists():
        parts += [grid.read_text().strip(), ""]
    text = "\n".join(parts)
    out.write_text(text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--search-speed", default=None, help="a text file with the search-scaling section (Markdown)")
    parser.add_argument(
        "--notes",
        default=None,
        help="a Markdown file of findings, placed after the introduction (default: findings.md in the results folder)",
    )
    args = parser.parse_args(argv)
    search_speed = Path(args.search_speed).read_text() if args.search_speed else None
    default_notes = Path(args.results) / "findings.md"
    notes = (
        Path(args.notes).read_text() if args.notes else default_notes.read_text() if default_notes.exists() else None
    )
    write_markdown(Path(args.results), Path(args.out), search_speed, notes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
