"""The figures: token maps share one colour scale, shown by a labelled colour bar."""

import torch
from PIL import Image

from attnctl.viz import maps_figure


def test_maps_figure_panels_share_one_scale_with_a_colour_bar(tmp_path):
    image = Image.new("RGB", (16, 16), (120, 40, 200))
    weak = torch.full((2, 4, 4), 0.01)
    strong = torch.zeros(2, 4, 4)
    strong[0, 1, 2], strong[1, 3, 3] = 0.6, 0.2
    fig = maps_figure({"plain": (image, weak), "method": (image, strong)}, ["cat", "dog"], tmp_path / "maps.png",
                      title="a cat and a dog")
    assert (tmp_path / "maps.png").is_file()
    overlays = [ax.images[1] for ax in fig.axes if len(ax.images) == 2]  # the maps over their images
    assert len(overlays) == 4
    top = float(strong.max())  # 0.6 in float32
    assert {(im.norm.vmin, im.norm.vmax) for im in overlays} == {(0.0, top)}
    assert {im.get_interpolation() for ax in fig.axes for im in ax.images} == {"nearest"}
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "attention probability"]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, top)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["cat", "dog"]
    assert sorted(ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()) == ["max 0.010"] * 2 + ["max 0.200",
                                                                                                   "max 0.600"]
