"""The reconstruction part of ``meddl demo``: simulate a small multi-coil file, reconstruct it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import ModelError

__all__ = ["run", "simulated_file"]


def simulated_file(path: str | Path, size: int = 160, coils: int = 8, seed: int = 0) -> Path:
    """A fully sampled 8-coil fastMRI-style file of dipy's T1 slice (one slice), with its reference."""
    from scipy.ndimage import zoom

    from ..data import load_sample
    from .fastmri import write_fastmri
    from .simulate import simulate_kspace

    img = load_sample("dipy_t1_slice").numpy()[0]
    img = zoom(img, size / img.shape[0], order=1)[:size, :size]
    img = np.clip(img / img.max(), 0, None).astype(np.float32)
    k, _, _ = simulate_kspace(img, coils, np.random.default_rng(seed), noise=0.002)
    return write_fastmri(
        path,
        k[None],
        fov_mm=(256.0, 256.0, 5.0),
        target=img[None],
        acquisition="SIMULATED_T1",
        patient_id="dipy_t1_slice",
    )


def run(out_dir: str | Path, ctx) -> list:
    from .. import io
    from ..demo import DemoItem
    from .pipeline import ReconstructionConfig, reconstruct

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx.reporter(0.0, "simulating multi-coil k-space")
    source = simulated_file(out / "simulated_8coil_kspace.h5")
    method = "varnet"
    started = time.perf_counter()
    try:
        result = reconstruct(
            source,
            ReconstructionConfig(method=method, undersample="equispaced", acceleration=4, uncertainty=True),
            device=ctx.device,
            progress=ctx.reporter.stage(0.1, 0.9),
        )
    except ModelError as exc:
        ctx.log(f"demo: VarNet weights unavailable ({exc}); using CG-SENSE")
        method = "cg-sense"
        result = reconstruct(
            source,
            ReconstructionConfig(method=method, undersample="equispaced", acceleration=4, uncertainty=True),
            device=ctx.device,
            progress=ctx.reporter.stage(0.1, 0.9),
        )
    seconds = time.perf_counter() - started
    ctx.log(f"reconstruction demo: {method} from 4x equispaced k-space (8 coils, "
            f"{' x '.join(str(n) for n in result.image.spatial_shape[:2])}) with a SURE uncertainty map, "
            f"{seconds:.1f} s on {ctx.device}")
    items = []
    for vol, name, title in (
        (result.zero_filled, "zero_filled_4x", "k-space 4x: zero-filled"),
        (result.image, f"{method}_4x", f"k-space 4x: {method}"),
        (result.uncertainty, f"{method}_4x_uncertainty", f"{method} uncertainty (SURE)"),
    ):
        path = io.write(vol, out / f"{name}.nii.gz")
        items.append(DemoItem(title, str(path), "volume", "reconstruction"))
    ctx.reporter(1.0, "reconstruction done")
    return items
