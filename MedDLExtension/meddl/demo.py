"""``meddl demo``: every available capability on offline sample data, into one folder.

Writes ``DIR/inputs/`` (the samples), one folder per capability that is part of this build
(its ``meddl.<capability>.demo.run(out_dir, ctx)`` returns what it made), ``DIR/MedDLDemo.mrml``
(a 3D Slicer scene that opens every file, when the MRML library is installed),
``DIR/overview.png`` (one picture of everything) and ``DIR/summary.json``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .volume import Kind, Volume

__all__ = ["DemoItem", "run_demo", "overview_png"]

# capability package -> its demo module
CAPABILITY_DEMOS = {
    "registration": "meddl.registration.demo",
    "reconstruction": "meddl.reconstruction.demo",
    "adaptation": "meddl.adaptation.demo",
    "incontext": "meddl.incontext.demo",
}


@dataclass(frozen=True)
class DemoItem:
    """One file the demo wrote, and how Slicer should show it."""

    title: str
    path: str
    role: str  # "volume", "label", "rgb", "segmentation", "transform"
    capability: str = "inputs"


def _write(vol: Volume, path: Path) -> Path:
    from . import io

    return io.write(vol, path)


def _inputs(out: Path, ctx) -> list[DemoItem]:
    from . import data

    items = []
    wanted = [("mni152_t1", "MNI152 T1", "volume"), ("mni152_brain_mask", "MNI152 brain mask", "segmentation"),
              ("ihc_rgb", "IHC slide (RGB)", "rgb"), ("dipy_t1_slice", "T1 coronal slice", "volume")]
    for i, (name, title, role) in enumerate(wanted):
        ctx.reporter(0.1 * i / len(wanted), f"sample {name}")
        vol = data.load_sample(name)
        suffix = ".nrrd" if role == "rgb" else ".nii.gz"
        path = _write(vol, out / "inputs" / f"{name}{suffix}")
        items.append(DemoItem(title, str(path), role))
    return items


def _capability_items(out: Path, ctx) -> tuple[list[DemoItem], list[str]]:
    items: list[DemoItem] = []
    missing = []
    names = list(CAPABILITY_DEMOS)
    for i, (cap, module_name) in enumerate(CAPABILITY_DEMOS.items()):
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(cap)
            continue
        module = importlib.import_module(module_name)
        stage = ctx.reporter.stage(0.1 + 0.8 * i / len(names), 0.1 + 0.8 * (i + 1) / len(names))
        sub_ctx = _StageContext(ctx, stage)
        ctx.log(f"demo: {cap}")
        items.extend(module.run(out / cap, sub_ctx))
    return items, missing


class _StageContext:
    """The run context with the reporter narrowed to one capability's share of the bar."""

    def __init__(self, ctx, reporter) -> None:
        self._ctx = ctx
        self.reporter = reporter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def _display_slice(vol: Volume) -> np.ndarray:
    """A 2D (rows, cols[, 3]) picture of a volume: the middle axial slice, radiological-free RAS view.

    A label map whose middle slice is empty (sparse annotations) shows its fullest slice instead.
    """
    arr = vol.numpy()
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    if vol.ndim == 3:
        k = arr.shape[3] // 2
        if vol.kind is Kind.LABEL and not arr[..., k].any() and arr.any():
            k = int(np.argmax((arr != 0).sum(axis=(0, 1, 2))))
        arr = arr[:, :, :, k]
    # (C, I, J) -> rows = J flipped so anterior/up is at the top, cols = I
    img = np.transpose(arr, (2, 1, 0))
    if vol.direction[1, 1] > 0:
        img = img[::-1]
    if img.shape[2] == 1:
        img = img[..., 0]
    elif img.shape[2] >= 3:
        img = img[..., :3]
    return img


def _to_uint8(img: np.ndarray, label: bool) -> np.ndarray:
    if img.dtype == np.uint8 and img.ndim == 3:
        return img
    img = img.astype(np.float64)
    if label:
        rng = np.random.default_rng(0)
        lut = rng.integers(60, 255, size=(int(img.max()) + 1, 3)).astype(np.uint8)
        lut[0] = 0
        return lut[np.clip(img.astype(np.int64), 0, len(lut) - 1)]
    lo, hi = np.percentile(img, [1, 99.5])
    scaled = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2) if scaled.ndim == 2 else scaled.astype(np.uint8)


def overview_png(items: list[DemoItem], path: Path, tile: int = 220) -> Path:
    """One PNG with a titled thumbnail of every item (transforms shown as their displacement size)."""
    from PIL import Image, ImageDraw

    from . import io

    pictures = []
    for item in items:
        if item.role == "transform":
            continue
        kind = Kind.LABEL if item.role in ("label", "segmentation") else None
        vol = io.read(item.path, kind=kind)
        img = _to_uint8(_display_slice(vol), label=kind is Kind.LABEL)
        pil = Image.fromarray(img).convert("RGB")
        pil.thumbnail((tile, tile))
        pictures.append((item.title, pil))
    cols = min(4, max(1, len(pictures)))
    rows = max(1, -(-len(pictures) // cols))
    head = 34  # two lines of the default bitmap font, about 36 characters each at this tile width
    canvas = Image.new("RGB", (cols * (tile + 10) + 10, rows * (tile + head + 12) + 10), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    for n, (title, pil) in enumerate(pictures):
        x = 10 + (n % cols) * (tile + 10)
        y = 10 + (n // cols) * (tile + head + 12)
        canvas.paste(pil, (x + (tile - pil.width) // 2, y + head + (tile - pil.height) // 2))
        lines = textwrap.wrap(title, width=36, max_lines=2, placeholder="...")
        draw.text((x, y + 4), "\n".join(lines), fill=(235, 235, 235))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _scene(items: list[DemoItem], path: Path) -> Path | None:
    """A Slicer scene holding every item, or None when the MRML library is not installed."""
    if importlib.util.find_spec("slicer") is None:
        return None
    try:
        from . import mrml
    except ImportError:
        return None
    from . import io

    scene = mrml.new_scene() if hasattr(mrml, "new_scene") else importlib.import_module("slicer").vtkMRMLScene()
    for item in items:
        name = Path(item.path).name.split(".")[0]
        if item.role == "transform":
            from .transforms import read_transform

            mrml.displacement_to_transform_node(read_transform(item.path), scene, name=name)
        elif item.role == "segmentation":
            mrml.labels_to_segmentation_node(io.read(item.path, kind=Kind.LABEL), scene, name=name)
        else:
            kind = Kind.LABEL if item.role == "label" else None
            mrml.volume_to_node(io.read(item.path, kind=kind), scene, name=name)
    return mrml.save_scene(scene, path)


def run_demo(output_dir: str | Path, ctx) -> dict:
    """Run the demo into ``output_dir``; returns the summary it also writes as JSON."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = _inputs(out, ctx)
    cap_items, missing = _capability_items(out, ctx)
    items += cap_items
    ctx.reporter(0.92, "Slicer scene")
    scene_path = _scene(items, out / "scene" / "MedDLDemo.mrml")
    ctx.reporter(0.96, "overview picture")
    png = overview_png(items, out / "overview.png")
    summary = {
        "outputs": [asdict(i) for i in items],
        "scene": str(scene_path) if scene_path else None,
        "overview": str(png),
        "capabilities_not_in_this_build": missing,
        "device": str(ctx.device),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ctx.reporter(1.0, "done")
    for cap in missing:
        ctx.log(f"demo: {cap} is not part of this build; skipped")
    if scene_path is None:
        ctx.log("demo: the MRML library (pip install slicer-core) is not installed; no Slicer scene written")
    ctx.summary(f"demo: {len(items)} outputs in {out}", scene=scene_path or "none", overview=png)
    return summary
