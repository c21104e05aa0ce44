"""Labels beside the points of a plot, overlapping neither each other nor the points.

matplotlib puts an annotation where it is told, so points that lie close together (three methods at
the same accuracy and speed) get labels printed over each other. `label_points` tries places around
each point, nearest first and in a fixed order, and takes the first where its label overlaps no label
placed before, no point and nothing else it is told to avoid (error bars), and stays inside the axes
(else the place that overlaps least); a label
set further off than the nearest ring gets a thin leader line to its point. The same figure always
gets the same placement.
"""
from __future__ import annotations

from typing import Sequence

# Around a point, in order of preference: right, up-right, down-right, left, up-left, down-left, up, down.
DIRECTIONS = ((1, 0), (1, 1), (1, -1), (-1, 0), (-1, 1), (-1, -1), (0, 1), (0, -1))
RINGS_PT = (5, 10, 16, 23, 31, 40, 50, 62, 76, 92, 110)   # distances from the point tried, in points
MARKER_PT = 4.5   # half the side of the square a point's marker is taken to cover, in points
AVOID_PT = 3.5    # margin kept around what else labels avoid: error bars (caps of 3 points), other markers
GAP_PT = 1.0      # room kept around every placed label, in points


def label_points(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 8,
                 avoid: Sequence[tuple[float, float, float, float]] = ()) -> list:
    """Annotate each (x, y) of `points` (data coordinates) with its text; returns the annotations. `avoid`:
    boxes (x0, y0, x1, y1) in data coordinates that labels keep off too, such as error bars (x0 == x1 and
    y0 == y1: an unlabelled marker).

    Call it once the axes' limits and the figure's layout are final (after tight_layout): the places are
    worked out in display pixels, which a later change of limits or layout moves the points under."""
    from matplotlib.transforms import Bbox

    figure = ax.figure
    figure.canvas.draw()   # settles autoscaled limits and the layout before anything is measured
    renderer = figure.canvas.get_renderer()
    px_per_pt = figure.dpi / 72
    axes_box = ax.get_window_extent(renderer)
    anchors = ax.transData.transform(list(points)) if len(points) else []
    side = MARKER_PT * px_per_pt
    taken = [Bbox.from_extents(px - side, py - side, px + side, py + side) for px, py in anchors]
    margin = AVOID_PT * px_per_pt
    for x0, y0, x1, y1 in avoid:
        (a0, b0), (a1, b1) = ax.transData.transform([(x0, y0), (x1, y1)])
        taken.append(Bbox.from_extents(min(a0, a1) - margin, min(b0, b1) - margin, max(a0, a1) + margin,
                                       max(b0, b1) + margin))
    legend = ax.get_legend()
    if legend is not None:   # "best" is chosen again at every draw: fix it where it is, then keep labels off it
        frame = legend.get_window_extent(renderer)
        legend.set_loc(tuple(ax.transAxes.inverted().transform((frame.x0, frame.y0))))
        taken.append(frame)
    gap = GAP_PT * px_per_pt
    annotations = []
    for (x, y), text in zip(points, texts):
        trial = ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 0), fontsize=fontsize)
        best = None
        for distance in RINGS_PT:
            for direction in DIRECTIONS:
                _place(trial, direction, distance)
                box = text_extent(trial, renderer)
                cost = sum(_overlap(box, other) for other in taken) + _outside(box, axes_box)
                if best is None or cost < best[0]:
                    best = (cost, direction, distance, box)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        trial.remove()
        _, direction, distance, box = best
        leader = None if distance == RINGS_PT[0] else {"arrowstyle": "-", "color": "0.45", "lw": 0.6,
                                                        "shrinkA": 1, "shrinkB": MARKER_PT}
        label = ax.annotate(text, (x, y), textcoords="offset points", fontsize=fontsize, arrowprops=leader,
                            **_alignment(direction, distance))
        taken.append(Bbox.from_extents(box.x0 - gap, box.y0 - gap, box.x1 + gap, box.y1 + gap))
        annotations.append(label)
    return annotations


def text_extent(annotation, renderer):
    """The display box of an annotation's text alone (matplotlib's own extent includes its leader line)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _alignment(direction: tuple[int, int], distance: float) -> dict:
    """The offset and the alignment that put the text's near side `distance` points from the point."""
    dx, dy = direction
    return {"xytext": (dx * distance, dy * distance),
            "ha": "left" if dx > 0 else "right" if dx < 0 else "center",
            "va": "bottom" if dy > 0 else "top" if dy < 0 else "center"}


def _place(annotation, direction: tuple[int, int], distance: float) -> None:
    where = _alignment(direction, distance)
    annotation.xyann = where["xytext"]
    annotation.set_horizontalalignment(where["ha"])
    annotation.set_verticalalignment(where["va"])


def _overlap(a, b) -> float:
    """Area two boxes share, in square pixels (0 when they only touch)."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _outside(box, bounds) -> float:
    """Area of `box` outside `bounds`: a label out of the axes would cover ticks, titles or nothing at all."""
    return box.width * box.height - _overlap(box, bounds)
