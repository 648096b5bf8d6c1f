"""What every figure the toolkit and its benchmarks write must have, checked on the Figure itself.

- a title: the figure's suptitle, or a title on every panel;
- labelled axes: every visible panel has an x label (or the figure one for all its panels), and
  every row of panels a y label (a panel whose y tick labels are hidden shares them with its row);
- readable text: no two titles, axis labels or figure legends overlap, and none runs off the figure;
- legends that do not cover data: every panel's legend lies outside that panel (figure legends sit
  outside every panel by construction).
"""

from __future__ import annotations

from matplotlib.figure import Figure


def _panels(fig: Figure) -> list:
    """The visible data panels (colour bars, which have no data of their own, left out)."""
    return [ax for ax in fig.axes if ax.axison and ax.get_visible() and ax.get_label() != "<colorbar>"]


def _overlap(a, b) -> float:
    """The area of the intersection of two display-space boxes."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def figure_problems(fig: Figure) -> list[str]:
    """Every way ``fig`` breaks the conventions above, one line each (empty: none)."""
    fig.draw_without_rendering()  # the layout engine has placed everything
    problems = []
    suptitle = fig.get_suptitle()
    panels = _panels(fig)
    shared_x = fig.get_supxlabel()
    if not panels and not suptitle:
        problems.append("no panel and no title")
    for i, ax in enumerate(panels):
        name = f"panel {i} ({ax.get_title() or 'untitled'})"
        if not suptitle and not ax.get_title():
            problems.append(f"{name}: no title, and the figure has none")
        if not ax.get_xlabel() and not shared_x:
            problems.append(f"{name}: no x label")
        if not ax.get_ylabel():
            box = ax.get_position()
            row = [other for other in panels if other is not ax and other.get_ylabel()
                   and min(box.y1, other.get_position().y1) > max(box.y0, other.get_position().y0)]
            if not row:
                problems.append(f"{name}: no y label, nor any panel beside it")
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            covered = _overlap(legend.get_window_extent(), ax.get_window_extent())
            if covered > 0.02 * legend.get_window_extent().width * legend.get_window_extent().height:
                problems.append(f"{name}: its legend lies over the data")
    problems += _text_problems(fig, panels)
    return problems


def _text_problems(fig: Figure, panels: list) -> list[str]:
    """Titles and axis labels that overlap one another or leave the figure."""
    texts = [t for t in fig.texts if t.get_text() and t.get_visible()]  # suptitle, supxlabel...
    for ax in panels:
        texts += [t for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text() and t.get_visible()]
    boxes = [(t.get_text(), t.get_window_extent()) for t in texts]
    boxes += [("figure legend", legend.get_window_extent()) for legend in fig.legends if legend.get_visible()]
    page = fig.bbox
    problems = [f"{text!r} runs off the figure" for text, box in boxes
                if box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1 or box.y0 < page.y0 - 1 or box.y1 > page.y1 + 1]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            if _overlap(box_a, box_b) > 1.0:
                problems.append(f"{a!r} overlaps {b!r}")
    return problems
