from __future__ import annotations

import pytest
import torch

from convlens.analysis import filters as fl
from convlens.analysis.filters import filter_responses, selectivity


def _naive_xcorr(img: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Zero-padded cross-correlation by loops: the independent oracle."""
    h, w = img.shape
    out = torch.zeros(h, w)
    for y in range(h):
        for x in range(w):
            s = 0.0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        s += float(img[yy, xx]) * float(k[dy + 1, dx + 1])
            out[y, x] = s
    return out


def test_vertical_kernel_on_vertical_edge_golden():
    r = filter_responses(fl.vertical_edge_image(), fl.VERTICAL)
    assert r.shape == (1, 1, 10, 10)
    interior = [
        0,
        0,
        0,
        0,
        3,
        3,
        0,
        0,
        0,
        -3,
    ]  # edge at columns 4|5; the bright block meets padding at 9
    border = [0, 0, 0, 0, 2, 2, 0, 0, 0, -2]  # rows 0 and 9 see one padded row
    expected = torch.tensor([border] + [interior] * 8 + [border], dtype=torch.float32)
    torch.testing.assert_close(r[0, 0], expected)


def test_diagonal_kernel_fires_on_the_diagonal_line():
    r = filter_responses(fl.diagonal_line_image(), fl.DIAGONAL)[0, 0]
    assert torch.equal(torch.diagonal(r)[1:-1], torch.full((8,), 6.0))  # 2+2+2 along the line
    assert r[0, 0] == 4.0 and r[9, 9] == 4.0  # one neighbour is padding
    assert r[4, 5] == -2.0  # just off the line: -1 -1 from two line pixels


def test_test_images():
    v = fl.vertical_edge_image()
    assert v.shape == (10, 10) and v[:, :5].sum() == 0 and v[:, 5:].sum() == 50
    assert torch.equal(fl.horizontal_edge_image(), v.t())
    assert torch.equal(fl.diagonal_line_image(), torch.eye(10))
    c = fl.checkerboard_image()
    assert c[0, 0] == 0 and c[0, 2] == 1 and c[2, 0] == 1 and c[1, 1] == 0
    assert list(fl.test_images()) == [
        "vertical_edge",
        "diagonal_line",
        "horizontal_edge",
        "checkerboard",
    ]


def test_responses_match_naive_loops_for_every_kernel_and_image():
    images, kernels = fl.test_images(), fl.KERNELS
    r = filter_responses(images, kernels)
    assert r.shape == (4, 7, 10, 10)
    for i, img in enumerate(images.values()):
        for j, k in enumerate(kernels.values()):
            torch.testing.assert_close(r[i, j], _naive_xcorr(img, k))


def test_default_kernels_are_the_course_three_and_inputs_accept_many_forms():
    r = filter_responses(fl.vertical_edge_image())
    assert r.shape == (1, 3, 10, 10)
    stack = torch.stack([fl.vertical_edge_image(), fl.diagonal_line_image()])
    assert filter_responses(stack.unsqueeze(1), [fl.VERTICAL]).shape == (2, 1, 10, 10)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="odd"):
        filter_responses(fl.vertical_edge_image(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="one shape"):
        filter_responses([torch.zeros(4, 4), torch.zeros(5, 5)])
    with pytest.raises(ValueError):
        filter_responses(torch.zeros(1, 2, 3, 4, 5))


def test_selectivity_table():
    t = selectivity()
    assert t.images == ("vertical_edge", "diagonal_line", "horizontal_edge", "checkerboard")
    assert t.value("vertical_edge", "vertical") == 3.0
    assert t.value("vertical_edge", "horizontal") == 0.0  # border excluded
    assert t.value("horizontal_edge", "horizontal") == 3.0
    assert t.value("diagonal_line", "diagonal") == 6.0
    assert t.best_kernel("diagonal_line") == "diagonal"
    assert t.best_kernel("horizontal_edge") == "sobel_y"  # Sobel weighs the middle row twice
    d = t.to_dict()
    assert d["peak"]["vertical_edge"]["sobel_x"] == 4.0
    assert "vertical_edge" in str(t)


def test_selectivity_with_border_shows_the_padding_artefact(tmp_path):
    t = selectivity(ignore_border=False)
    # the bright half meets the zero padding at the top row: a "horizontal edge"
    assert t.value("vertical_edge", "horizontal") == 3.0
    path = t.save(tmp_path)
    assert path.name == "selectivity.json" and '"ignore_border": false' in path.read_text()


def test_constants_cannot_be_edited_through_autograd():
    assert not fl.VERTICAL.requires_grad
