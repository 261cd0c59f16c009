"""Stain normalisation of TIFF images of any size, streamed tile by tile.

Two passes over the file, one decoded tile (or strip) in memory at a time:

1. sampling: every ``step``-th pixel (:func:`~meddl.adaptation.stain.sample_step`), chosen by its index
   in the :class:`~meddl.volume.Volume` order ``(x, y)`` -> ``x * height + y``, so the sample is
   exactly the one :func:`~meddl.adaptation.stain.adapt_stain` takes from the same image in memory;
   ONE set of stain statistics is estimated from it;
2. mapping: each tile is mapped pixel-wise with those statistics and written to a tiled TIFF.

A 40,000 x 40,000 slide therefore never sits in memory: the peak is one tile (a band of
``tile`` rows for striped input) plus the sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import atomic_path
from ..progress import CancelToken, ProgressCallback, Reporter
from ..volume import Volume
from .stain import StainConfig, StainNormalizer, _rgb_pixels, fit_stains, map_stains, sample_step

__all__ = ["adapt_stain_tiff", "tiff_tiles"]


def _open_page(path: Path):
    import tifffile

    if not path.is_file():
        raise InputError(f"cannot read '{path}': no such file")
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as exc:  # tifffile raises several types for non-TIFF files
        raise InputError(f"cannot read '{path}': not a TIFF file ({exc})") from exc
    page = tif.pages[0]
    shape = page.shape
    ok = (
        len(shape) == 3
        and shape[-1] in (3, 4)
        and page.dtype == np.uint8
        and int(page.planarconfig) == 1  # contiguous samples (RGBRGB...)
    )
    if not ok:
        tif.close()
        raise InputError(
            f"'{path}': expected an 8-bit RGB(A) TIFF with interleaved samples, got shape {shape}, "
            f"dtype {page.dtype}, planar configuration {int(page.planarconfig)}"
        )
    if page.is_tiled and (int(page.tilelength) % 16 or int(page.tilewidth) % 16):
        tif.close()
        raise InputError(
            f"'{path}': tiles of {int(page.tilelength)} x {int(page.tilewidth)} pixels; the TIFF standard (and "
            "this reader) expects multiples of 16, re-tile the file first"
        )
    try:  # decode one segment now, so a codec that is missing fails before any work
        next(iter(page.segments()), None)
    except (ValueError, RuntimeError) as exc:
        tif.close()
        raise InputError(f"cannot decode '{path}': {str(exc).splitlines()[0][:200]}") from None
    return tif, page


def _segment_shape(page) -> tuple[int, int]:
    """Rows and columns of one stored segment: a tile, or a strip of the full width."""
    if page.is_tiled:
        return int(page.tilelength), int(page.tilewidth)
    return int(page.rowsperstrip or page.shape[0]), int(page.shape[1])


def tiff_tiles(path: str | os.PathLike) -> Iterator[tuple[int, int, np.ndarray]]:
    """Decoded segments (tiles or strips) of the first page: ``(y, x, array (h, w, S))``, cropped."""
    tif, page = _open_page(Path(path))
    height, width, samples = page.shape
    seg_h, seg_w = _segment_shape(page)
    try:
        for segment, index, _ in page.segments():
            y, x = int(index[2]), int(index[3])
            if segment is None:  # an empty (sparse) tile reads as zeros, as tifffile.imread gives it
                yield y, x, np.zeros((min(seg_h, height - y), min(seg_w, width - x), samples), np.uint8)
                continue
            h, w = min(segment.shape[1], height - y), min(segment.shape[2], width - x)
            yield y, x, segment[0, :h, :w]
    finally:
        tif.close()


def _sample_tile(tile: np.ndarray, y: int, x: int, height: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a tile whose Volume-order index ``x * height + y`` is a multiple of ``step``."""
    h, w = tile.shape[:2]
    flat = (np.arange(x, x + w, dtype=np.int64)[None, :] * height + np.arange(y, y + h, dtype=np.int64)[:, None])
    keep = flat % step == 0
    flat, px = flat[keep], tile[keep]
    if px.shape[-1] == 4:  # transparent pixels are not sampled (as in memory: stain._strided)
        opaque = px[:, 3] > 0
        flat, px = flat[opaque], px[opaque]
    return flat, px[:, :3]


def adapt_stain_tiff(
    source: str | os.PathLike,
    reference: Volume,
    output: str | os.PathLike,
    config: StainConfig | None = None,
    progress: ProgressCallback | Reporter | None = None,
    cancel: CancelToken | None = None,
    device: Any = None,
    tile: int = 512,
    compression: str | None = "zlib",
) -> Path:
    """Normalise the stains of a TIFF slide of any size to ``reference``, tile by tile.

    Args:
        source: 8-bit RGB(A) TIFF, tiled or striped (first page; pyramid levels are not copied).
        reference: RGB volume with the target staining.
        output: tiled TIFF to write (atomically); tiles as the input's, or ``tile`` x ``tile``.
        compression: TIFF compression of the output (``None`` for none).
    Returns:
        The output path.
    """
    import tifffile
    import torch

    config = config if config is not None else StainConfig()
    rep = Reporter.of(progress, cancel)
    source, output = Path(source), Path(output)
    if source.resolve() == output.resolve():
        raise InputError(f"output '{output}' is also the input; choose another output path")
    if tile < 16 or tile % 16:
        raise InputError(f"tile size: expected a multiple of 16, got {tile}")
    norm = StainNormalizer(config, device)
    rep(0.0, "estimating the reference's stains")
    norm.fit(reference)
    dev = norm.device

    tif, page = _open_page(source)
    height, width, samples = page.shape
    tiled = bool(page.is_tiled)  # tiles are multiples of 16 (_open_page); strips are re-tiled through row bands
    tile_shape = (int(page.tilelength), int(page.tilewidth)) if tiled else (tile, tile)
    n_segments = len(page.dataoffsets)
    resolution = {}  # the pixel spacing, as the in-memory path keeps it
    for key, tag in (("x", "XResolution"), ("y", "YResolution"), ("unit", "ResolutionUnit")):
        if page.tags.get(tag) is not None:
            resolution[key] = page.tags[tag].value
    tif.close()

    # pass 1: the sample (same pixels, same order as the in-memory path)
    step = sample_step(height * width, config.max_samples, height)
    stage = rep.stage(0.05, 0.3)
    indices, pixels = [], []
    for i, (y, x, seg) in enumerate(tiff_tiles(source)):
        flat, px = _sample_tile(seg, y, x, height, step)
        indices.append(flat)
        pixels.append(px)
        stage((i + 1) / n_segments, "sampling tissue")
    order = np.argsort(np.concatenate(indices), kind="stable")
    sample = np.concatenate(pixels)[order]
    sample_t = torch.from_numpy(np.ascontiguousarray(sample.T)).to(dev)
    source_fit = fit_stains(sample_t, config, "image")
    del indices, pixels, sample, sample_t

    # pass 2: map and write
    stage = rep.stage(0.3, 1.0)

    def mapped(seg: np.ndarray) -> np.ndarray:
        px, _ = _rgb_pixels(torch.from_numpy(np.ascontiguousarray(seg[..., :3].reshape(-1, 3).T)), "image", dev)
        out = map_stains(px, source_fit, norm.target, config).T.reshape(seg.shape[0], seg.shape[1], 3).cpu().numpy()
        if samples == 4:
            out = np.concatenate((out, seg[..., 3:]), axis=-1)
        return out

    def tiles_out() -> Iterator[np.ndarray]:
        th, tw = tile_shape
        if tiled:
            for i, (_, _, seg) in enumerate(tiff_tiles(source)):
                block = np.zeros((th, tw, samples), np.uint8)
                block[: seg.shape[0], : seg.shape[1]] = mapped(seg)
                stage((i + 1) / n_segments, "normalising tiles")
                yield block
            return
        band = np.zeros((th, width, samples), np.uint8)
        filled, band_y = 0, 0
        for i, (_, _, seg) in enumerate(tiff_tiles(source)):
            seg = mapped(seg)
            row = 0
            while row < seg.shape[0]:
                take = min(th - filled, seg.shape[0] - row)
                band[filled : filled + take] = seg[row : row + take]
                filled += take
                row += take
                if filled == th or band_y + filled == height:
                    yield from _band_tiles(band, filled, tw, samples)
                    band_y += filled
                    filled = 0
            stage((i + 1) / n_segments, "normalising strips")

    photometric = "rgb"
    extrasamples = ("unassalpha",) if samples == 4 else None
    with atomic_path(output) as tmp:
        tifffile.imwrite(
            str(tmp), tiles_out(), shape=(height, width, samples), dtype=np.uint8, tile=tile_shape,
            photometric=photometric, compression=compression, extrasamples=extrasamples,
            **({"resolution": (resolution["x"], resolution["y"]), "resolutionunit": resolution.get("unit")}
               if "x" in resolution and "y" in resolution else {}),
        )
    rep(1.0, "done")
    return output


def _band_tiles(band: np.ndarray, rows: int, tile_width: int, samples: int) -> Iterator[np.ndarray]:
    th, width = band.shape[0], band.shape[1]
    for x in range(0, width, tile_width):
        block = np.zeros((th, tile_width, samples), np.uint8)
        w = min(tile_width, width - x)
        block[:rows, :w] = band[:rows, x : x + w]
        yield block
