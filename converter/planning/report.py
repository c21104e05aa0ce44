"""OUT/report.json: one machine-readable record of a conversion, updated by validate and bench."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from ..artifact import REPORT_FILE, read_json


def read_report(out_dir: Path) -> dict:
    return read_json(Path(out_dir) / REPORT_FILE)


def block_table(original, compressed) -> list[dict]:
    """Per block, original -> compressed: heads, QK/V head dims, FFN channels (TCS: selected), tokens."""
    rows = []
    for a, b in zip(original.blocks, compressed.blocks):
        selected = [lin.selected_in for lin in (b.ffn.fc1, b.ffn.fc2) if lin.selected_in is not None]
        rows.append({
            "block": a.index, "heads": [a.attn.heads, b.attn.heads],
            "head_dim_qk": [a.attn.head_dim_qk, b.attn.head_dim_qk], "head_dim_v": [a.attn.head_dim_v, b.attn.head_dim_v],
            "ffn_channels": [a.ffn.hidden, b.ffn.hidden], "tcs_selected": selected or None,
            "tokens": [a.tokens, b.tokens], "gflops": [a.flops.total / 1e9, b.flops.total / 1e9]})
    return rows


def flops_breakdown(original, compressed) -> dict:
    def parts(g):
        return {"patch_embed": g.flops.patch_embed,
                "attention_projections": sum(b.flops.attn_proj for b in g.blocks),
                "attention_matmuls": sum(b.flops.attn_matmul for b in g.blocks),
                "ffn": sum(b.flops.ffn for b in g.blocks), "head": g.flops.head, "other": g.flops.other,
                "total": g.flops.total}
    return {"original": parts(original), "compressed": parts(compressed)}


def _plot(report: dict, path: Path) -> bool:
    """Agreement (or accuracy) against latency, original and compressed; False when not measured."""
    fig = report_figure(report)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def report_figure(report: dict):
    """The plot of `_plot`, or None when latency or validation was not measured."""
    latency = report.get("latency", {}).get("backends", {})
    validation = report.get("validation")
    if not latency or not validation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot_labels import label_points

    accuracy = validation.get("accuracy")
    if accuracy:
        quality = {"original": accuracy["reference_top1"], "compressed": accuracy["compressed_top1"]}
        label = "top-1 accuracy"
    else:
        quality = {"original": 1.0, "compressed": validation["top1_agreement"]}
        label = "top-1 agreement with the original"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    markers = iter("osD^v<>")
    points, texts, drawn = [], [], []
    for backend, rows in latency.items():
        for batch in sorted({r["batch"] for r in rows}):
            compressed = next(r for r in rows if r["batch"] == batch and r["variant"] == "compressed")
            xs = [1.0, 1.0 / compressed["speedup"]]   # the paired figure, not a ratio of separate medians
            ax.plot(xs, [quality["original"], quality["compressed"]], marker=next(markers, "o"), linestyle=":",
                    label=f"{backend}, batch {batch}")
            if not points:   # one label each: every line runs from the original to the compressed model,
                points += [(xs[0], quality["original"]), (xs[1], quality["compressed"])]   # the legend names them
                texts += ["original", "compressed"]
            drawn += [(x, y, x, y) for x, y in zip(xs, (quality["original"], quality["compressed"]))]
    ax.set_xlabel("latency relative to the original, 1 / median paired speedup (lower is better)")
    ax.set_ylabel(label)
    ax.set_title(f"{report.get('method', 'compressed')}: {label} against latency", fontsize=10)
    ax.margins(x=0.15, y=0.15)   # room for the labels of the outermost points inside the axes
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    label_points(ax, points, texts, avoid=drawn)   # after the layout: labels are placed in display pixels
    return fig


def _markdown(report: dict, has_plot: bool) -> str:
    lines = [f"# vit2trt report: {report.get('method', '?')} on {Path(report.get('source_path', '?')).name}", ""]
    flops = report.get("flops", {})
    if flops:
        lines += [f"GFLOPs {flops['before'] / 1e9:.3f} → {flops['after'] / 1e9:.3f} "
                  f"({flops['before'] / max(flops['after'], 1):.2f}× fewer).", ""]
    lines += _heal_lines(report.get("heal"))
    validation = report.get("validation")
    if validation:
        lines += ["## Validation against the reference", "",
                  f"{validation['images']} inputs from `{validation['source']}`. Reference: "
                  f"{validation.get('reference', 'the PyTorch model')}.", ""]
        if validation.get("reference_note"):
            lines += [f"Note: {validation['reference_note']}", ""]
        if validation.get("reference_kind") == "onnx":
            lines += ["Without a PyTorch model the surgery itself (the graph against PyTorch compressed alike) "
                      "is not checked; give --reference timm:NAME --weights FILE for that.", ""]
        lines += [
                  "| check | value |", "| --- | --- |",
                  f"| top-1 agreement | {validation['top1_agreement'] * 100:.1f}% |",
                  f"| logits cosine, mean / min | {validation['cosine_mean']:.5f} / {validation['cosine_min']:.5f} |",
                  f"| max abs error (relative) | {validation['max_abs_error']:.3g} ({validation['relative_error']:.2g}) |",
                  f"| batch vs single runs, max diff | {validation['batch_dependence']:.2g} |"]
        if validation.get("surgery_error") is not None:
            lines.append(f"| graph vs PyTorch compressed alike (relative) | {validation['surgery_error']:.2g} |")
        if validation.get("surgery_near_ties"):
            lines.append(f"| ToMe merges that rounding decided, the reference following the graph | "
                         f"{validation['surgery_near_ties']} |")
        accuracy = validation.get("accuracy")
        if accuracy:
            lines += [f"| top-1 accuracy, original / compressed | {accuracy['reference_top1'] * 100:.1f}% / "
                      f"{accuracy['compressed_top1'] * 100:.1f}% |",
                      f"| top-5 accuracy, original / compressed | {accuracy['reference_top5'] * 100:.1f}% / "
                      f"{accuracy['compressed_top5'] * 100:.1f}% |"]
        engine = validation.get("engine")
        if isinstance(engine, dict):
            lines.append(f"| engine: top-1 agreement, max abs error | {engine['top1_agreement'] * 100:.1f}%, "
                         f"{engine['max_abs_error']:.3g} |")
        elif engine:
            lines.append(f"| engine | {engine} |")
        for failure in validation.get("failures", []):
            lines.append(f"| **failed** | {failure} |")
        lines.append("")
    latency = report.get("latency")
    if latency:
        lines += ["## Latency", "", _latency_caption(latency), "",
                  "| backend | variant | batch | median ms | p90 ms | speedup [95% interval] |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for backend, rows in latency["backends"].items():
            for r in rows:
                lines.append(f"| {backend} | {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | "
                             f"{r['p90_ms']:.2f} | {speedup_cell(r, latency.get('flops_ratio'))} |")
        lines.append("")
    if has_plot:
        lines += ["![accuracy or agreement against latency](report.png)", ""]
    breakdown = report.get("flops_breakdown")
    if breakdown:
        lines += ["## FLOPs (multiply-accumulates, batch 1)", "", "| part | original | compressed |",
                  "| --- | --- | --- |"]
        for part in ("patch_embed", "attention_projections", "attention_matmuls", "ffn", "head", "other", "total"):
            lines.append(f"| {part.replace('_', ' ')} | {breakdown['original'][part] / 1e9:.3f} G | "
                         f"{breakdown['compressed'][part] / 1e9:.3f} G |")
        lines.append("")
    blocks = report.get("blocks")
    if blocks:
        lines += ["## Blocks (original → compressed)", "",
                  "| block | heads | QK dim | V dim | FFN channels | tokens | GFLOPs |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        arrow = lambda pair: str(pair[0]) if pair[0] == pair[1] else f"{pair[0]} → {pair[1]}"  # noqa: E731
        for row in blocks:
            ffn = arrow(row["ffn_channels"]) + (f" (TCS keeps {'/'.join(map(str, row['tcs_selected']))})"
                                                if row.get("tcs_selected") else "")
            lines.append(f"| {row['block']} | {arrow(row['heads'])} | {arrow(row['head_dim_qk'])} | "
                         f"{arrow(row['head_dim_v'])} | {ffn} | {arrow(row['tokens'])} | "
                         f"{row['gflops'][0]:.3f} → {row['gflops'][1]:.3f} |")
        lines.append("")
    build = report.get("build")
    if build:
        how = build.get("how") or {}
        lines += ["## Engine", "", f"{build['backend']}: {build['status']}. {build['message']}", ""]
        if how:
            lines.append(f"Module {how['module']} {how['version']}, precision {how['precision']}, "
                         f"targets {', '.join(how['targets'])}; {len(build.get('layers') or [])} network layers.")
        lines.append("")
    notes = report.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _heal_lines(heal: Optional[dict]) -> list[str]:
    """The heal section: what was trained on what, and the held-out judge before and after."""
    if not heal:
        return []
    before, after = heal["holdout_before"], heal["holdout_after"]
    lines = ["## Healing", "",
             f"Distilled from the original ({heal['recipe']} recipe{', with labels' if heal.get('labels') else ''}) on "
             f"{heal['images']} images for {heal['epochs']:g} epochs ({heal['steps']} steps) in {heal['seconds']:.0f} s "
             f"on {heal['device']}; judged on {heal['holdout_images']} held-out images, never trained on. The "
             f"healed graph equals the healed PyTorch model within {heal['check']['relative_error']:.1g} (relative).",
             "", "| held-out images | before | after |", "| --- | --- | --- |",
             f"| KL divergence from the original | {before['kl']:.4f} | {after['kl']:.4f} |",
             f"| top-1 agreement with the original | {before['agreement'] * 100:.1f}% | {after['agreement'] * 100:.1f}% |"]
    if "top1" in before:
        lines.append(f"| top-1 accuracy | {before['top1'] * 100:.1f}% | {after['top1'] * 100:.1f}% |")
    if "ce" in before:   # with labels the best state is chosen by KL + cross-entropy
        lines.append(f"| cross-entropy with the labels | {before['ce']:.4f} | {after['ce']:.4f} |")
    if heal.get("stopped_by", "schedule") != "schedule":
        lines += ["", f"Training stopped early ({heal['stopped_by']}); the best state by the held-out judge was written."]
    return lines + [""]


def speedup_cell(row: dict, flops_ratio=None, ascii: bool = False) -> str:
    """A latency row's speedup as converter/measure/speedup.py writes it (interval, unstable, beyond FLOPs)."""
    from ..measure.speedup import Speedup, format_speedup

    figure = Speedup.reference() if row.get("variant") == "original" else Speedup.from_json(row, flops_ratio)
    return format_speedup(figure, ascii)


def _latency_caption(latency: dict) -> str:
    if "max_rounds" not in latency:   # a record from before paired timing: ratios of medians
        return (f"Median and p90 of {latency['repeats']} interleaved rounds, {latency['threads']} threads, "
                f"{latency['inputs']} inputs; speedup = ratio of medians.")
    return (f"Latency: median and p90 per run over the paired rounds, {latency['threads']} threads, "
            f"{latency['inputs']} inputs. Speedup: median of back-to-back ratios original / compressed "
            f"(order alternating; {latency['repeats']} to {latency['max_rounds']} pairs, at most "
            f"{latency['time_cap_s']:g} s) with its 95% bootstrap interval; unstable where the interval stayed "
            "wider than ±5%, flagged where it exceeds the FLOPs ratio.")


_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#1d1d1f;line-height:1.45}table{border-collapse:collapse;margin:.5rem 0 1.2rem}
th,td{border-bottom:1px solid #ddd;padding:.3rem .7rem;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f4f5f7}h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:1.6rem}img{max-width:100%}
code{background:#f4f5f7;padding:0 .2rem}"""


def _html(text: str, plot: Optional[Path]) -> str:
    """The Markdown report as one self-contained page (the plot inlined)."""
    import base64

    import markdown

    body = markdown.markdown(text, extensions=["tables"])
    if plot is not None:
        data = base64.b64encode(plot.read_bytes()).decode()
        body = body.replace('src="report.png"', f'src="data:image/png;base64,{data}"')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vit2trt report</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def render_report(out_dir: Path) -> list[Path]:
    """Write report.md, report.html and (with validation and latency) report.png from report.json."""
    out_dir = Path(out_dir)
    report = read_report(out_dir)
    plot_path = out_dir / "report.png"
    staged = out_dir / ".report.png.tmp"
    has_plot = _plot(report, staged) if report else False
    if has_plot:
        os.replace(staged, plot_path)
    markdown = _markdown(report, has_plot)
    written = [plot_path] if has_plot else []
    for name, text in (("report.md", markdown), ("report.html", _html(markdown, plot_path if has_plot else None))):
        with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as fh:
            fh.write(text)
        os.replace(fh.name, out_dir / name)
        written.append(out_dir / name)
    return written
