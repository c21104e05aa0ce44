"""Point labels in the project's plots never print over each other: measured on the drawn figures with
matplotlib's own text extents."""
from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from vit2trt.converter.demo import demo_figure  # noqa: E402
from vit2trt.converter.planning.plot_labels import label_points, text_extent  # noqa: E402
from vit2trt.converter.planning.report import report_figure  # noqa: E402
from vit2trt.converter.measure.speedup import Speedup  # noqa: E402


def share_area(a, b) -> bool:
    """Two display boxes overlap by more than half a pixel each way (touching is no overlap)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


def overlaps(ax) -> list[tuple[str, str]]:
    """Pairs of the axes' annotation texts whose boxes share area on the drawn figure."""
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    boxes = [(t.get_text(), text_extent(t, renderer)) for t in ax.texts]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if share_area(box_a, box_b)]


def outside_axes(ax) -> list[str]:
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    return [t.get_text() for t in ax.texts if not frame.contains(*text_extent(t, renderer).min)
            or not frame.contains(*text_extent(t, renderer).max)]


def demo_rows() -> dict:
    """The demo's layout: three rows at nearly the same accuracy and speed near 94% (the uncompressed model
    and the two settings that keep accuracy), the others apart."""
    def row(speedup, accuracy, stable=True):
        s = Speedup(speedup, speedup * 0.9, speedup * 1.1, 30, stable, 3.0)
        return {"accuracy": accuracy, "flops_ratio": 3.0, "speedup_b8": s.as_json()}

    return {"uncompressed": {"accuracy": 0.94, "speedup_b8": Speedup.reference().as_json()},
            "toast": row(1.15, 0.544, False), "asvit": row(1.04, 0.90, False), "cait": row(2.04, 0.567),
            "tome": row(1.08, 0.856), "toast_keep": row(1.02, 0.941), "toast+tome_keep": row(1.01, 0.9395, False)}


def test_the_demo_plot_labels_every_point_without_overlap():
    fig = demo_figure(demo_rows())
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["uncompressed", "toast (unstable)", "asvit (unstable)", "cait", "tome", "toast_keep",
                     "toast+tome_keep (unstable)"]
    assert overlaps(ax) == [] and outside_axes(ax) == []
    plt.close(fig)


def test_the_check_sees_labels_put_at_one_offset_overlap():
    """What the demo plot did before: every label 5 points right of and 3 above its point."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, row in demo_rows().items():
        point = (Speedup.from_json(row["speedup_b8"]).speedup, row["accuracy"] * 100)
        ax.plot(*point, "o")
        ax.annotate(name, point, textcoords="offset points", xytext=(5, 3), fontsize=8)
    assert {frozenset(pair) for pair in overlaps(ax)} >= {frozenset(("uncompressed", "toast+tome_keep")),
                                                        frozenset(("toast_keep", "toast+tome_keep"))}
    plt.close(fig)


def test_many_labels_on_one_spot_spread_apart_with_leader_lines():
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    points = [(1.0 + i * 1e-3, 50.0) for i in range(10)] + [(0.0, 0.0), (2.0, 100.0)]
    ax.scatter(*zip(*points))
    fig.tight_layout()
    labels = label_points(ax, points, [f"candidate number {i}" for i in range(len(points))])
    assert len(ax.texts) == len(points) and overlaps(ax) == [] and outside_axes(ax) == []
    assert any(label.arrow_patch is not None for label in labels)   # those set off the nearest ring
    plt.close(fig)


@pytest.mark.parametrize("accuracy", [None, {"reference_top1": 0.8, "compressed_top1": 0.8}],
                         ids=["agreement", "accuracy"])
def test_the_report_plot_labels_do_not_overlap(accuracy):
    """Batch sizes whose speedups coincide put every compressed point on one spot."""
    rows = []
    for batch, speedup in ((1, 1.30), (8, 1.31), (16, 1.30)):
        rows += [{"variant": "original", "batch": batch}, {"variant": "compressed", "batch": batch,
                                                          "speedup": speedup}]
    validation = {"top1_agreement": 0.999, **({"accuracy": accuracy} if accuracy else {})}
    fig = report_figure({"method": "toast", "latency": {"backends": {"ort": rows, "tensorrt": rows}},
                         "validation": validation})
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["compressed", "original"]
    assert overlaps(ax) == [] and outside_axes(ax) == []
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(share_area(legend, text_extent(t, renderer)) for t in ax.texts)
    plt.close(fig)
