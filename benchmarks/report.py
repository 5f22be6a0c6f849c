"""Writes a results document (runner.BenchRun.document) as results.json, results.md and chart.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

JSON_NAME, MARKDOWN_NAME, CHART_NAME = "results.json", "results.md", "chart.png"
SYSTEM_COLOURS = {"torch": "#d62728", "optimum": "#ff7f0e", "engine": "#1f77b4", "engine-int8": "#2ca02c"}


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = Path(out) / JSON_NAME
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _gib(value: int | None) -> str:
    return f"{value / 2**30:.2f} GiB" if value else "-"


def _load(seconds: float | None) -> str:
    """The worker's model load (a bundle's verification and sessions, for the engines), in seconds."""
    return f"{seconds:.2f}" if seconds else "-"


def _num(stats: dict[str, float] | None, digits: int = 3, key: str = "median") -> str:
    return f"{stats[key]:.{digits}f}" if stats else "-"


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "optimum", "onnxruntime") if k in v)
    flags = "/".join(m.get("cpu_flags") or []) or "no AVX-512"
    quota = f" (a cgroup CPU quota of {m['cpu_quota']:g})" if m.get("cpu_quota") is not None else ""
    return (f"{m['cpu_model']} ({flags}), {m['available_cpus']} CPUs available{quota}, {m['threads']} threads, "
            f"{_gib(m.get('memory_total_bytes'))} RAM; {libs}; {m['date']}")


def title(results: dict[str, Any]) -> str:
    """What was timed (benchmarks.models.ModelSet.title); results written before it had one name the size."""
    model = results["model"]
    return str(model.get("title") or f"{model['size']} size")


def markdown(results: dict[str, Any]) -> str:
    """The human table: one row per system and batch size, per-image seconds (medians)."""
    model = results["model"]
    settings = results["settings"]
    ceiling = results["ceiling"].get("matmul_gflops")
    flops = (model.get("encoder_flops_per_image") or {}).get("total")
    params = f"{model['parameters'] / 1e6:.1f}M parameters, " if model.get("parameters") else ""
    lines = [
        f"# edlight benchmark ({title(results)})",
        "",
        f"Machine: {machine_line(results)}.",
        f"Model: {params}{model['max_patches']} patches per image, {settings['tokens']} generated tokens forced "
        f"(min_new_tokens = max_new_tokens, greedy); {settings['warmup']} warm-up and {settings['repeats']} timed "
        "runs per cell, median (min-max) over the timed runs; each system in its own process.",
    ]
    images = model.get("images") or []
    if images:
        folder = os.path.commonpath(images) if len(images) > 1 else os.path.dirname(images[0])
        lines.append(f"Images: {len(images)} from {folder}; every run at batch b captions the first b of them "
                     "(repeated in turn when b is larger).")
    if ceiling:
        trimmed = any(r.get("encoder_patches_per_image", model["max_patches"]) != model["max_patches"] for r in results["results"])
        credit = " (an engine that cuts an image's padding off is credited with the patches it ran)" if trimmed else ""
        lines.append(f"Ceiling: ONNX Runtime fp32 MatMul 2048x768 @ 768x2048 at {ceiling:.0f} GFLOP/s; "
                     f"encoder work {flops / 1e9:.3g} GFLOP per image at {model['max_patches']} patches{credit}." if flops else
                     f"Ceiling: ONNX Runtime fp32 MatMul at {ceiling:.0f} GFLOP/s.")
    lines += [
        "",
        "| system | batch | preprocess s/img | encoder s/img | decode s/img | decode ms/step | total s/img (min-max) "
        "| images/s | time vs Optimum | load s | peak RSS | encoder GFLOP/s | of ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    optimum = {r["batch_size"]: r["total_s_per_image"]["median"] for r in results["results"]
               if r["system"] == "optimum" and r.get("total_s_per_image")}
    for r in results["results"]:
        if not r.get("total_s_per_image"):
            why = r.get("error") if r.get("status") == "not run" else f"failed: {r.get('error') or 'no timed run'}"
            lines.append(f"| {r['system']} | {r['batch_size']} | {why} | | | | | | | | | | |")
            continue
        total = r["total_s_per_image"]
        ratio = f"{total['median'] / optimum[r['batch_size']]:.2f}x" if r["batch_size"] in optimum else "-"
        gflops = f"{r['encoder_gflops_per_s']:.0f}" if r.get("encoder_gflops_per_s") else "-"
        share = f"{100 * r['encoder_ceiling_fraction']:.0f}%" if r.get("encoder_ceiling_fraction") else "-"
        cut_short = " (cut short, see notes)" if r.get("status") == "failed" or _stopped_early(r, settings) else ""
        lines.append(
            f"| {r['system']}{cut_short} | {r['batch_size']} | {_num(r['preprocess_s_per_image'])} | {_num(r['encoder_s_per_image'])} "
            f"| {_num(r['decode_s_per_image'])} | {_num(r['decode_ms_per_step'], 1)} "
            f"| {total['median']:.3f} ({total['min']:.3f}-{total['max']:.3f}) | {r['images_per_s']:.3g} | {ratio} "
            f"| {_load(r.get('load_s'))} | {_gib(r.get('peak_rss_bytes'))} | {gflops} | {share} |"
        )
    every_scaling = results.get("batch_scaling") or []
    scaling = [row for row in every_scaling if "throughput_ratio" in row]  # the others are said in the notes
    if scaling:
        small, large = scaling[0]["batch_sizes"]
        per_run = scaling[0].get("images_per_run", large)
        small_per_run = scaling[0].get("small_images_per_run", per_run)
        covering = (f"every run of both captioning the same {per_run} images in whole batches" if small_per_run == per_run
                    else f"every run captioning whole batches: {small_per_run} images at batch {small}, {per_run} at "
                         f"batch {large}, the same images in turn")  # fmt: skip
        lines += [
            "",
            f"Batch scaling, timed interleaved (a batch-{small} and a batch-{large} worker alive together, their "
            f"{scaling[0]['repeats']} timed runs alternating, {covering}; the table's batch sizes ran one after another):",
            "",
            f"| system | batch {small} s/img | batch {large} s/img | throughput batch {large} / batch {small} |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {row['system']} | {row['s_per_image'][str(small)]:.3f} | {row['s_per_image'][str(large)]:.3f} "
            f"| {row['throughput_ratio']:.2f}x |"
            for row in scaling
        ]
    notes = [f"- {system}: skipped ({why})" for system, why in results.get("skipped", {}).items()]
    notes += [f"- {row['system']}: batch scaling {'failed' if row.get('error') else 'skipped'} "
              f"({row.get('error') or row.get('skipped')})" for row in every_scaling if "throughput_ratio" not in row]
    wanted = results.get("settings", {}).get("repeats")
    notes += [f"- {r['system']} at batch {r['batch_size']}: failed after {r['repeats']} of {wanted} timed runs "
              f"({r.get('error') or 'no reason given'}); its row is those runs'"
              for r in results["results"] if r.get("status") == "failed" and r.get("total_s_per_image")]
    notes += [f"- {r['system']} at batch {r['batch_size']}: stopped after {r['repeats']} of {wanted} timed runs"
              for r in results["results"] if r.get("status") != "failed" and _stopped_early(r, settings)]
    notes += [f"- {note}" for note in results.get("notes", [])]
    alone = [r for r in results["results"] if not r.get("interleaved", True)]
    if alone and results.get("settings", {}).get("interleave", True):
        notes += [f"- {r['system']} at batch {r['batch_size']}: run alone, not interleaved (memory)" for r in alone]
    elif alone:
        notes.append("- each system ran alone, not interleaved (--no-interleave)")
    mismatched = [f"{r['system']} (batch {r['batch_size']})" for r in results["results"]
                  if r.get("captions_match_torch") is False]
    if mismatched:
        notes.append(f"- captions differ from PyTorch's on the same batch: {', '.join(mismatched)}")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def _stopped_early(row: dict[str, Any], settings: dict[str, Any]) -> bool:
    """A cell with timed runs, but fewer than asked for: the run was stopped while it measured."""
    return bool(row.get("total_s_per_image")) and row.get("repeats", 0) < settings.get("repeats", 0)


def write_markdown(results: dict[str, Any], out: Path) -> Path:
    path = Path(out) / MARKDOWN_NAME
    path.write_text(markdown(results), encoding="utf-8")
    return path


def write_chart(results: dict[str, Any], out: Path) -> Path:
    """Seconds per image by system and batch size: grouped bars, encoder share darker, min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["results"] if r.get("total_s_per_image")]
    settings = results.get("settings", {})
    systems = list(dict.fromkeys(r["system"] for r in results["results"]))
    batches = sorted({r["batch_size"] for r in results["results"]})
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(batches) * max(len(systems), 1) / 2, 4.5), dpi=120)
    for i, system in enumerate(systems):
        cells = {r["batch_size"]: r for r in rows if r["system"] == system}
        xs = [b_i + (i - (len(systems) - 1) / 2) * width for b_i, b in enumerate(batches) if b in cells]
        found = [cells[b] for b in batches if b in cells]
        if not found:
            continue
        totals = [c["total_s_per_image"]["median"] for c in found]
        encoders = [c["encoder_s_per_image"]["median"] for c in found]
        errors = [[t - c["total_s_per_image"]["min"] for t, c in zip(totals, found, strict=True)],
                  [c["total_s_per_image"]["max"] - t for t, c in zip(totals, found, strict=True)]]
        colour = SYSTEM_COLOURS.get(system, "grey")
        # A cell that failed or was stopped partway has fewer timed runs than asked: hatched, and said above it.
        short = [c.get("status") == "failed" or _stopped_early(c, settings) for c in found]
        hatches = ["///" if cut else None for cut in short]
        ax.bar(xs, totals, width, color=colour, alpha=0.45, label=system, yerr=errors, capsize=3, hatch=hatches)
        ax.bar(xs, encoders, width, color=colour, alpha=0.95, hatch=hatches)
        for x, t, c, cut in zip(xs, totals, found, short, strict=True):  # above the whisker, so they never overlap
            ax.annotate(f"{t:.3g}" + ("\ncut short" if cut else ""), (x, c["total_s_per_image"]["max"]), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    totals_all = [r["total_s_per_image"]["median"] for r in rows]
    log_scale = bool(totals_all) and max(totals_all) > 15 * min(totals_all)
    if log_scale:
        ax.set_yscale("log")  # PyTorch next to a 10x faster runtime: linear bars would hide the fast ones
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    # On a log scale the dark bar's height is the encoder's seconds, not its share of the bar (8% read as 70%).
    ax.set_ylabel("seconds per image, log scale\n(dark: encoder seconds, not its share)" if log_scale
                  else "seconds per image (dark: encoder)")
    m = results["machine"]
    ax.set_title(f"edlight bench, {title(results)}, {m['threads']} threads\n{m['cpu_model']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(out) / CHART_NAME
    fig.savefig(path)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """chart.png (when matplotlib is installed; else a note), then results.json and results.md."""
    Path(out).mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    try:
        paths["chart"] = write_chart(results, out)
    except ImportError:
        results.setdefault("notes", []).append("chart: skipped (matplotlib is not installed)")
    paths["json"] = write_json(results, out)
    paths["markdown"] = write_markdown(results, out)
    return paths
