"""Domain-adaptation part of ``meddl demo``.

Stain: scikit-image's IHC slide is re-stained (its stain vectors and concentrations perturbed with
scikit-image's own colour deconvolution, so the shift owes nothing to our code) and normalised back
to the original with Macenko; the H and DAB concentration maps are written too. Fourier: the MNI152
T1 given a smooth multiplicative bias field and a gamma change is adapted towards the clean template
(feather-light FDA, circular window, 3D), and histogram matching is written beside it as the baseline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..volume import Volume

__all__ = ["run", "restain", "shift_intensity"]


def restain(rgb: Volume, seed: int = 0, vector_sd: float = 0.08, scale: tuple[float, float] = (0.7, 1.4)) -> Volume:
    """The same slide with other stains: HED vectors perturbed, concentrations rescaled (uint8 RGB)."""
    from skimage.color import combine_stains, hed_from_rgb, rgb_from_hed, separate_stains

    rng = np.random.default_rng(seed)
    pixels = np.transpose(rgb.numpy()[:3], (2, 1, 0)).astype(np.float64) / 255.0  # (rows, cols, 3)
    hed = separate_stains(pixels, hed_from_rgb)
    hed = hed * rng.uniform(*scale, size=3)
    vectors = rgb_from_hed + rng.normal(0.0, vector_sd, size=rgb_from_hed.shape)
    vectors = np.abs(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    out = np.clip(combine_stains(hed, vectors), 0.0, 1.0)
    data = np.round(np.transpose(out, (2, 1, 0)) * 255.0).astype(np.uint8)
    return rgb.with_data(data, restained_seed=seed)


def shift_intensity(image: Volume, seed: int = 0) -> Volume:
    """A scanner-like shift: a smooth multiplicative bias field and a gamma change."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = image.numpy()[0].astype(np.float32)
    x = x / max(float(x.max()), 1e-6)
    field = gaussian_filter(rng.normal(size=x.shape), 10)
    bias = np.exp(0.3 * field / field.std())
    bias = (bias / bias.mean()).astype(np.float32)
    return image.with_data((np.clip(x, 0, None) ** 0.6 * bias)[None].astype(np.float32), shifted_seed=seed)


def run(out_dir: Path, ctx) -> list:
    """Write the stain and Fourier examples into ``out_dir``; returns the demo items."""
    from .. import data, io
    from ..demo import DemoItem
    from . import FourierConfig, StainConfig, adapt_fourier, adapt_stain, histogram_match, separate_stains

    out_dir = Path(out_dir)
    items = []
    reference = data.load_sample("ihc_rgb")
    restained = restain(reference, seed=3)
    ctx.reporter(0.1, "stain: Macenko normalisation")
    normalised = adapt_stain(restained, reference, StainConfig(method="macenko"), progress=ctx.reporter.stage(0.1, 0.4),
                             device=ctx.device)
    stains = separate_stains(normalised, "hed", device=ctx.device)
    for title, vol, name in (("IHC re-stained", restained, "ihc_restained.nrrd"),
                             ("IHC normalised (Macenko)", normalised, "ihc_macenko.nrrd")):
        items.append(DemoItem(title, str(io.write(vol, out_dir / name)), "rgb", "adaptation"))
    for stain in ("H", "DAB"):
        if stain in stains:
            path = io.write(stains[stain], out_dir / f"ihc_macenko_{stain}.nii.gz")
            items.append(DemoItem(f"{stain} concentration", str(path), "volume", "adaptation"))

    ctx.reporter(0.5, "Fourier: FDA towards the clean template")
    template = data.load_sample("mni152_t1")
    shifted = shift_intensity(template, seed=5)
    adapted = adapt_fourier(shifted, [template], FourierConfig(window="circle", mode="3d"),
                            progress=ctx.reporter.stage(0.5, 0.9), device=ctx.device)
    matched = histogram_match(shifted, template)
    for title, vol, name in (("T1 with bias + gamma", shifted, "t1_shifted.nii.gz"),
                             ("T1 after FDA (circle, 3D)", adapted, "t1_fda.nii.gz"),
                             ("T1 histogram-matched", matched, "t1_histmatch.nii.gz")):
        items.append(DemoItem(title, str(io.write(vol, out_dir / name)), "volume", "adaptation"))
    ref = template.numpy()[0] / max(float(template.numpy().max()), 1e-6)

    def err(v: Volume) -> float:
        x = v.numpy()[0]
        x = x / max(float(x.max()), 1e-6)
        return float(np.sqrt(np.mean((x - ref) ** 2)))

    ctx.log(f"adaptation demo: RMS error to the clean template: shifted {err(shifted):.3f}, FDA {err(adapted):.3f}, "
            f"histogram matching {err(matched):.3f}")
    ctx.reporter(1.0, "adaptation done")
    return items
