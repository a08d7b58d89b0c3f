"""linreg_fused.plot: PNG files of the stated pixel size, with one or both panels."""

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import matplotlib.image  # noqa: E402

from linreg_fused.plot import training_plot  # noqa: E402


def png_size(path) -> tuple[int, int]:
    raw = open(path, "rb").read(24)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


@pytest.mark.parametrize("size, dpi, pixels", [((10, 4), 100, (1000, 400)), ((6.4, 4.8), 50, (320, 240))])
def test_both_panels_at_the_stated_size(tmp_path, size, dpi, pixels):
    history = list(np.geomspace(1e4, 10, 30))
    pred, true = torch.randn(5000, 2), torch.randn(5000, 2)
    path = tmp_path / "p.png"
    training_plot(path, history, val_history=[h * 1.5 for h in history], predicted=pred, actual=true,
                  target_names=["a", "b"], rows_label="validation rows", size=size, dpi=dpi)
    assert png_size(path) == pixels
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == pixels[::-1] and image.std() > 0.05  # decodes, and is not blank


def test_one_panel_each(tmp_path):
    training_plot(tmp_path / "curves.png", [3.0, 2.0, 1.0])
    training_plot(tmp_path / "scatter.png", [], predicted=np.arange(4.0), actual=np.arange(4.0) + 0.5)
    assert png_size(tmp_path / "curves.png") == png_size(tmp_path / "scatter.png") == (1000, 400)
    with pytest.raises(ValueError, match="nothing to plot"):
        training_plot(tmp_path / "none.png", [])
    with pytest.raises(ValueError, match="differ in shape"):
        training_plot(tmp_path / "bad.png", [1.0], predicted=np.zeros((3, 2)), actual=np.zeros((3, 1)))
