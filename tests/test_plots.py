"""The heatmaps: colour scales set by the donor cells (gain) and the off-diagonal cosines, controls and
the diagonal shown apart, colour bars with units, PNGs cropped to their content; small grids draw too."""

import polars as pl
import pytest
from PIL import Image

from qvlib import plots

TASKS = ["dots", "glyphs", "mnist5knumerals", "numerals", "shapes"]


def pair_rows(tasks, merged=True, self_gain=70.0):
    """Donor gains in [-2, 3], random controls in [-1, 1], the receiver's own vector at ``self_gain``."""
    rows = []
    for i, r in enumerate(tasks):
        for j, d in enumerate(tasks):
            if d != r:
                g = -2.0 + 5.0 * ((i * 7 + j * 3) % 11) / 10
                rows.append(dict(receiver=r, donor=d, control="none", kind="single", gain_lambda1=g, gain_oracle=g / 2))
                rows.append(dict(receiver=r, donor=d, control="random", kind="single", gain_lambda1=-1.0, gain_oracle=1.0))
        rows.append(dict(receiver=r, donor=r, control="self", kind="single", gain_lambda1=self_gain, gain_oracle=self_gain))
        if merged:
            rows.append(dict(receiver=r, donor="merged:mean", control="none", kind="merged", gain_lambda1=2.5, gain_oracle=3.0))
            rows.append(dict(receiver=r, donor="merged:mean", control="random", kind="merged", gain_lambda1=0.0, gain_oracle=0.5))
    return pl.DataFrame(rows).with_columns(seed=pl.lit(0))


def cosine_rows(tasks, merged=True):
    rows = [dict(seed=0, task_a=a, task_b=b, cosine=1.0 if a == b else 0.01 + 0.01 * ((i + j) % 9))
            for i, a in enumerate(tasks) for j, b in enumerate(tasks)]
    if merged:
        rows += [dict(seed=0, task_a=a, task_b="merged:mean", cosine=-0.05) for a in tasks]
    return pl.DataFrame(rows)


def meshes(fig):
    """(axes, QuadMesh) of every heatmap in the figure (the colour bar's axes excluded)."""
    return [(ax, coll) for ax in fig.axes for coll in ax.collections if hasattr(coll, "get_array") and ax.get_label() != "<colorbar>"]


def test_gain_colour_range_follows_the_donor_cells_not_self():
    rows = pair_rows(TASKS)
    donors = rows.filter(pl.col("control") == "none")
    expected = float(donors.select(pl.max_horizontal(pl.col("gain_lambda1", "gain_oracle").abs()).max()).item())
    assert 2.0 <= expected <= 3.0
    fig = plots.gain_figure(rows, title="t")
    try:
        norms = {(float(m.norm.vmin), float(m.norm.vmax)) for ax, m in meshes(fig) if m.get_cmap().name == "RdYlGn"}
        assert norms == {(-expected, expected)}  # one scale for both panels, set by donors (merged included), not 70
        (cbar,) = [ax for ax in fig.axes if ax.get_ylabel() == plots.GAIN_UNITS]
        assert cbar.get_ylim() == pytest.approx((-expected, expected))
        # the self column is annotated on a neutral colour, its values still readable
        texts = {t.get_text() for ax in fig.axes for t in ax.texts}
        assert "+70.0" in texts and "-2.0" in texts
        # the merged donor is a donor column of each panel, the controls are random and self
        donor_axes = [ax for ax in fig.axes if ax.get_xlabel() == "donor"]
        assert len(donor_axes) == 2
        assert [t.get_text() for t in donor_axes[0].get_xticklabels()] == [*TASKS, "merged:mean"]
    finally:
        plots._matplotlib().close(fig)


def test_gain_colour_range_is_at_least_one_point():
    rows = pair_rows(["a", "b"], merged=False).with_columns(pl.col("gain_lambda1", "gain_oracle") * 0.1)
    assert plots.gain_color_range([plots.gain_matrices(rows, "gain_lambda1")[0]]) == 1.0


def test_gain_heatmap_png_is_cropped_and_sized_by_the_grid(tmp_path):
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    plots.heatmap_gain(pair_rows(TASKS), big, title="vit_demo w2-channel: gain over PTQ (points)")
    plots.heatmap_gain(pair_rows(TASKS[:2], merged=False), small)
    with Image.open(big) as im, Image.open(small) as sm:
        w, h = plots.gain_figure_size(5, 6, 2)
        # cropped to its content: narrower than the canvas, and every edge column/row holds some ink
        assert 0.6 * w * plots.DPI < im.size[0] <= w * plots.DPI + 40 and im.size[1] < h * plots.DPI + 120
        assert sm.size[0] < im.size[0] and sm.size[1] < im.size[1]
        grey = im.convert("L")
        W, H = im.size
        for box in ((0, 0, 20, H), (W - 20, 0, W, H), (0, 0, W, 20), (0, H - 20, W, H)):  # left, right, top, bottom
            assert grey.crop(box).getextrema()[0] < 160, box  # ink within 20 px of every edge: no blank margin


def test_cosine_scale_follows_the_off_diagonal_and_the_diagonal_is_apart(tmp_path):
    fig = plots.cosine_figure(cosine_rows(TASKS))
    try:
        scaled = [m for ax, m in meshes(fig) if m.get_cmap().name == "vlag"]
        # off-diagonal cosines reach 0.08 (the merged column -0.05); the diagonal's 1.0 does not set the scale
        assert scaled and all((m.norm.vmin, m.norm.vmax) == pytest.approx((-0.08, 0.08)) for m in scaled)
        main = fig.axes[0]
        assert "1" in {t.get_text() for t in main.texts}  # the diagonal annotated, on the neutral colour
        # the colour bar sits right of the merged column, not over it
        side = [ax for ax in fig.axes if ax.get_title() == "vs own vector"][0]
        (cbar,) = [ax for ax in fig.axes if ax.get_ylabel() == plots.COSINE_UNITS]
        assert cbar.get_position().x0 > side.get_position().x1
    finally:
        plots._matplotlib().close(fig)
    plots.heatmap_cosine(cosine_rows(TASKS), tmp_path / "cos.png")
    with Image.open(tmp_path / "cos.png") as im:
        assert im.size[0] > 300


def test_tick_labels_do_not_overlap():
    import math

    for fig in (plots.gain_figure(pair_rows(TASKS)), plots.cosine_figure(cosine_rows(TASKS))):
        try:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            for ax in fig.axes:
                ys = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]
                assert not any(a.overlaps(b) for a, b in zip(ys, ys[1:])), ax.get_title()
                xs = [t for t in ax.get_xticklabels() if t.get_text()]
                if len(xs) > 1:  # parallel labels at 45 degrees: their distance apart exceeds a line's height
                    step = abs(xs[1].get_window_extent(renderer).x1 - xs[0].get_window_extent(renderer).x1)
                    angle = math.radians(xs[0].get_rotation())
                    assert step * math.sin(angle) > 1.2 * xs[0].get_size() * fig.dpi / 72, ax.get_title()
        finally:
            plots._matplotlib().close(fig)


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_tasks_draw(tmp_path, n):
    plots.heatmap_gain(pair_rows(TASKS[:n], merged=n > 1), tmp_path / "g.png")
    plots.heatmap_cosine(cosine_rows(TASKS[:n], merged=False), tmp_path / "c.png")
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
