"""TIFF slides streamed tile by tile (meddl.adaptation.tiling) agree with the in-memory path."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from meddl import InputError, Volume, io
from meddl.adaptation import StainConfig, adapt_stain, adapt_stain_tiff


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    """A non-square (H, W, 3) = (200, 210, 3) slide whose size is not a multiple of the tile size.

    With ``max_samples`` 7000 the sample stride is 6 for the true line length (H = 200) and would
    be 8 for W = 210, so a height/width mix-up between the streamed and in-memory paths shows.
    """
    from skimage import data

    ihc = data.immunohistochemistry()
    return np.ascontiguousarray(np.concatenate((ihc[:100, :210], ihc[300:400, 100:310][:, ::-1]), axis=0))


@pytest.fixture(scope="module")
def reference() -> Volume:
    from skimage import data

    return Volume(np.ascontiguousarray(data.immunohistochemistry()[256:, 256:].transpose(2, 1, 0)))


def _in_memory(rgb: np.ndarray, reference: Volume, config: StainConfig) -> np.ndarray:
    out = adapt_stain(Volume(np.ascontiguousarray(rgb.transpose(2, 1, 0))), reference, config, device="cpu")
    return out.numpy().transpose(2, 1, 0)


@pytest.mark.parametrize(
    "layout,method,max_samples",
    [("tiled", "macenko", 1 << 18), ("striped", "macenko", 7000), ("tiled", "vahadane", 7000),
     ("striped", "reinhard", 7000)],
)
def test_streamed_tiles_equal_the_in_memory_result(layout, method, max_samples, slide, reference, tmp_path):
    src = tmp_path / "slide.tif"
    if layout == "tiled":
        tifffile.imwrite(src, slide, tile=(64, 96), photometric="rgb", compression="zlib")
    else:
        tifffile.imwrite(src, slide, rowsperstrip=37, photometric="rgb")
    config = StainConfig(method=method, max_samples=max_samples)
    out = adapt_stain_tiff(src, reference, tmp_path / "out.tif", config, device="cpu", tile=128)
    streamed = tifffile.imread(out)
    assert streamed.shape == slide.shape and streamed.dtype == np.uint8
    # the same sample, the same statistics, the same pixel-wise map
    assert np.array_equal(streamed, _in_memory(slide, reference, config))
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].is_tiled


def test_output_reads_back_through_meddl_io_in_volume_order(slide, reference, tmp_path):
    src = tmp_path / "slide.tif"
    tifffile.imwrite(src, slide, tile=(64, 64), photometric="rgb")
    out = adapt_stain_tiff(src, reference, tmp_path / "out.tif", device="cpu")
    vol = io.read(out)
    assert vol.spatial_shape == (slide.shape[1], slide.shape[0])  # (I, J) = (x, y)
    # ITK reads tiled TIFFs as RGBA (alpha 255): compare the colour channels
    assert np.array_equal(vol.numpy()[:3], _in_memory(slide, reference, StainConfig()).transpose(2, 1, 0))


def test_alpha_channel_is_kept(slide, reference, tmp_path):
    rgba = np.concatenate((slide, np.full(slide.shape[:2] + (1,), 77, np.uint8)), axis=2)
    src = tmp_path / "rgba.tif"
    tifffile.imwrite(src, rgba, tile=(64, 64), photometric="rgb", extrasamples=("unassalpha",))
    out = tifffile.imread(adapt_stain_tiff(src, reference, tmp_path / "out.tif", device="cpu"))
    assert out.shape == rgba.shape and np.all(out[..., 3] == 77)


def test_bad_tiffs_are_refused(slide, reference, tmp_path):
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, slide[..., 0])
    with pytest.raises(InputError, match=r"expected an 8-bit RGB\(A\) TIFF"):
        adapt_stain_tiff(grey, reference, tmp_path / "o.tif", device="cpu")
    text = tmp_path / "not.tif"
    text.write_text("hello")
    with pytest.raises(InputError, match=r"not a TIFF file"):
        adapt_stain_tiff(text, reference, tmp_path / "o.tif", device="cpu")
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((64, 64, 3), 250, np.uint8), photometric="rgb")
    with pytest.raises(InputError, match=r"background only"):
        adapt_stain_tiff(blank, reference, tmp_path / "o.tif", device="cpu")
    assert not (tmp_path / "o.tif").exists()  # nothing half-written
    with pytest.raises(InputError, match=r"also the input"):
        adapt_stain_tiff(blank, reference, blank, device="cpu")


def test_sparse_tiles_compression_and_pixel_spacing(slide, reference, tmp_path):
    img = np.ascontiguousarray(slide[:128, :192])

    def tiles():
        for ty in range(2):
            for tx in range(3):  # one tile left empty: a sparse TIFF, it reads as zeros
                yield None if (ty, tx) == (0, 1) else img[ty * 64:(ty + 1) * 64, tx * 64:(tx + 1) * 64]

    sparse = tmp_path / "sparse.tif"
    tifffile.imwrite(sparse, tiles(), shape=img.shape, dtype=np.uint8, tile=(64, 64), photometric="rgb",
                     compression="lzw", resolution=(4000, 4000), resolutionunit="CENTIMETER")  # 2.5 um pixels
    full = tifffile.imread(sparse)
    assert int(full[:64, 64:128].max()) == 0
    out = tmp_path / "out.tif"
    adapt_stain_tiff(sparse, reference, out, device="cpu")
    np.testing.assert_array_equal(tifffile.imread(out), _in_memory(full, reference, StainConfig()))
    np.testing.assert_allclose(io.read(out).spacing, [0.0025, 0.0025])  # the input's 2.5 um pixels, in mm


def test_tiles_that_are_not_multiples_of_16_are_refused(slide, reference, tmp_path, monkeypatch):
    from meddl.adaptation import tiling

    path = tmp_path / "t.tif"
    tifffile.imwrite(path, slide, tile=(64, 64), photometric="rgb")
    real = tifffile.TiffFile

    class OddTiles:  # tifffile cannot write tiles of 24 rows, other writers can: the page says so here
        tilelength = 24

        def __init__(self, page):
            self._page = page

        def __getattr__(self, name):
            return getattr(self._page, name)

    class File:
        def __init__(self, name):
            self._file = real(name)
            self.pages = [OddTiles(self._file.pages[0])]

        def close(self):
            self._file.close()

    monkeypatch.setattr(tifffile, "TiffFile", File)
    with pytest.raises(InputError, match=r"tiles of 24 x 64 pixels; the TIFF standard .* multiples of 16"):
        tiling._open_page(path)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small images: one thread is faster, and far faster on a busy machine (no OpenMP barriers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
