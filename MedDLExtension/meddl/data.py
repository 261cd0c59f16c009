"""Sample data built offline from what the package registries ship.

Always available (inside PyPI wheels): nilearn's MNI152 2009a T1 template and its brain,
grey- and white-matter masks; scikit-image's ``ihc.png`` (RGB immunohistochemistry); dipy's
``t1_coronal_slice.npy``. When the Debian packages are installed: Colin27 (``mricron-data``:
``ch2``, ``ch2bet``), the label atlases AAL, Harvard-Oxford cortical, JHU white matter and
natbrainlab, and ITK's brain slices (``insighttoolkit4-examples``).

Only the files named in :data:`SAMPLES` are ever read: the project keeps other files of those
packages as an evaluation reserve, so this is an allowlist, never a directory scan.

Samples are converted once to NIfTI (NRRD for RGB) in a cache folder:
``$MEDDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/meddl``, else ``~/.cache/meddl``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DependencyError, InputError
from .volume import Kind, Volume, affine_from_geometry

__all__ = ["Sample", "SAMPLES", "list_samples", "available_samples", "sample_path", "load_sample", "cache_dir"]

MRICRON = Path(os.environ.get("MEDDL_MRICRON_DIR", "/usr/share/mricron/templates"))
ITK_EXAMPLES = Path(
    os.environ.get("MEDDL_ITK_EXAMPLES_DIR", "/usr/share/doc/insighttoolkit4-examples/examples/Data")
)


@dataclass(frozen=True)
class Sample:
    """One sample: how to build it, its kind and where it comes from."""

    name: str
    description: str
    kind: Kind
    source: str  # "nilearn", "skimage", "dipy", "mricron-data", "insighttoolkit4-examples"
    build: Callable[[], Volume]
    suffix: str = ".nii.gz"

    def available(self) -> bool:
        if self.source == "mricron-data":
            return (MRICRON / self._debian_file).is_file()
        if self.source == "insighttoolkit4-examples":
            return (ITK_EXAMPLES / self._debian_file).is_file()
        return True

    @property
    def _debian_file(self) -> str:
        return _DEBIAN_FILES[self.name]


def cache_dir() -> Path:
    env = os.environ.get("MEDDL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meddl"


# -- builders -----------------------------------------------------------------------------------


def _need(module: str, extra: str = "data"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"sample data: the package '{module}' is needed; install it with pip install 'meddl[{extra}]'"
        ) from exc


def _from_nibabel(img, kind: Kind) -> Volume:
    """nibabel's affine is voxel->RAS with (i, j, k) array order: exactly a Volume's."""
    data = np.asarray(img.dataobj)
    if kind is Kind.LABEL:
        data = np.rint(data).astype(np.int16)
    else:
        data = data.astype(np.float32)
    return Volume(data[None], np.asarray(img.affine, dtype=np.float64), kind)


def _nilearn(loader: str, kind: Kind, resolution: int = 2) -> Callable[[], Volume]:
    def build() -> Volume:
        datasets = _need("nilearn.datasets")
        img = getattr(datasets, loader)(resolution=resolution)
        vol = _from_nibabel(img, kind)
        return vol.with_data(vol.data, source=f"nilearn.datasets.{loader}(resolution={resolution})")

    return build


def _ihc() -> Volume:
    skdata = _need("skimage.data")
    rgb = skdata.immunohistochemistry()  # (rows, cols, 3) uint8
    # rows run along -y on screen: index (i = column, j = row), spacing 1 (pixels), LPS-like display
    data = np.ascontiguousarray(np.transpose(rgb, (2, 1, 0)))
    affine = affine_from_geometry([1.0, 1.0], [0.0, 0.0], np.diag([-1.0, -1.0]))
    return Volume(data, affine, Kind.INTENSITY, {"source": "skimage.data.immunohistochemistry()", "unit": "pixel"})


def _dipy_slice() -> Volume:
    import importlib.util

    spec = importlib.util.find_spec("dipy")
    if spec is None or spec.origin is None:
        raise DependencyError("sample data: the package 'dipy' is needed; install it with pip install 'meddl[data]'")
    path = Path(spec.origin).parent / "data" / "files" / "t1_coronal_slice.npy"
    # stored as a picture, (rows, cols) = (j, i), shown upright by imshow: same layout as a PNG
    arr = np.ascontiguousarray(np.load(path).astype(np.float32).T)
    affine = affine_from_geometry([1.0, 1.0], [0.0, 0.0], np.diag([-1.0, -1.0]))
    return Volume(arr[None], affine, Kind.INTENSITY, {"source": "dipy/data/files/t1_coronal_slice.npy"})


def _debian(name: str, kind: Kind) -> Callable[[], Volume]:
    def build() -> Volume:
        from . import io

        sample = SAMPLES[name]
        root = MRICRON if sample.source == "mricron-data" else ITK_EXAMPLES
        path = root / _DEBIAN_FILES[name]
        if not path.is_file():
            raise InputError(
                f"sample '{name}': {path} not found; install the Debian package '{sample.source}' "
                f"(apt-get install {sample.source})"
            )
        vol = io.read(path, kind=kind)
        arr = vol.numpy()
        if vol.channels in (3, 4) and np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
            vol = vol.with_data(arr[:1].copy())  # grey PNG stored as RGB(A)
        if kind is Kind.LABEL:
            vol = vol.with_data(vol.numpy().astype(np.int16))
        elif np.issubdtype(vol.numpy().dtype, np.integer):
            vol = vol.with_data(vol.numpy().astype(np.float32))
        return vol

    return build


_DEBIAN_FILES = {
    "colin27_t1": "ch2.nii.gz",
    "colin27_brain": "ch2bet.nii.gz",
    "aal": "aal.nii.gz",
    "harvard_oxford_cortical": "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz",
    "jhu_white_matter": "JHU-WhiteMatter-labels-1mm.nii.gz",
    "natbrainlab": "natbrainlab.nii.gz",
    "itk_brain_pd_slice": "BrainProtonDensitySlice.png",
    "itk_brain_t1_slice": "BrainT1Slice.png",
    "itk_brain_pd_slice_r10x13y17": "BrainProtonDensitySliceR10X13Y17.png",
    "itk_brain_pd_slice_shifted13x17y": "BrainProtonDensitySliceShifted13x17y.png",
}


def _samples() -> dict[str, Sample]:
    items = [
        Sample("mni152_t1", "MNI152 2009a T1 template, 2 mm (nilearn)", Kind.INTENSITY, "nilearn",
               _nilearn("load_mni152_template", Kind.INTENSITY)),
        Sample("mni152_t1_1mm", "MNI152 2009a T1 template at its native 1 mm (nilearn)", Kind.INTENSITY, "nilearn",
               _nilearn("load_mni152_template", Kind.INTENSITY, resolution=1)),
        Sample("mni152_brain_mask", "MNI152 brain mask, 2 mm (nilearn)", Kind.LABEL, "nilearn",
               _nilearn("load_mni152_brain_mask", Kind.LABEL)),
        Sample("mni152_gm_mask", "MNI152 grey-matter mask, 2 mm (nilearn)", Kind.LABEL, "nilearn",
               _nilearn("load_mni152_gm_mask", Kind.LABEL)),
        Sample("mni152_wm_mask", "MNI152 white-matter mask, 2 mm (nilearn)", Kind.LABEL, "nilearn",
               _nilearn("load_mni152_wm_mask", Kind.LABEL)),
        Sample("ihc_rgb", "Immunohistochemistry RGB slide, 512x512 (scikit-image ihc.png)", Kind.INTENSITY,
               "skimage", _ihc, ".nrrd"),
        Sample("dipy_t1_slice", "T1 coronal slice, 256x256 (dipy)", Kind.INTENSITY, "dipy", _dipy_slice),
    ]
    described = {
        "colin27_t1": ("Colin27 T1, 1 mm (mricron-data ch2)", Kind.INTENSITY, "mricron-data"),
        "colin27_brain": ("Colin27 T1 brain-extracted, 1 mm (mricron-data ch2bet)", Kind.INTENSITY, "mricron-data"),
        "aal": ("AAL label atlas (mricron-data)", Kind.LABEL, "mricron-data"),
        "harvard_oxford_cortical": ("Harvard-Oxford cortical max-prob atlas, 1 mm (mricron-data)", Kind.LABEL, "mricron-data"),
        "jhu_white_matter": ("JHU white-matter labels, 1 mm (mricron-data)", Kind.LABEL, "mricron-data"),
        "natbrainlab": ("NatBrainLab label atlas (mricron-data)", Kind.LABEL, "mricron-data"),
        "itk_brain_pd_slice": ("ITK proton-density brain slice (insighttoolkit4-examples)", Kind.INTENSITY, "insighttoolkit4-examples"),
        "itk_brain_t1_slice": ("ITK T1 brain slice (insighttoolkit4-examples)", Kind.INTENSITY, "insighttoolkit4-examples"),
        "itk_brain_pd_slice_r10x13y17": ("ITK PD slice rotated 10 deg, shifted (13, 17) px", Kind.INTENSITY, "insighttoolkit4-examples"),
        "itk_brain_pd_slice_shifted13x17y": ("ITK PD slice shifted (13, 17) px", Kind.INTENSITY, "insighttoolkit4-examples"),
    }
    for name, (desc, kind, source) in described.items():
        items.append(Sample(name, desc, kind, source, _debian(name, kind)))
    return {s.name: s for s in items}


SAMPLES: dict[str, Sample] = _samples()


def list_samples() -> list[str]:
    """Every sample name this build knows, available or not."""
    return list(SAMPLES)


def available_samples() -> list[str]:
    """The samples that can be built on this machine now."""
    return [n for n, s in SAMPLES.items() if s.available()]


def _get(name: str) -> Sample:
    try:
        return SAMPLES[name]
    except KeyError:
        raise InputError(f"sample '{name}': unknown; expected one of {', '.join(SAMPLES)}") from None


def sample_path(name: str) -> Path:
    """Build the sample once and return its cached file (NIfTI, or NRRD for RGB)."""
    from . import io

    sample = _get(name)
    target = cache_dir() / f"{name}{sample.suffix}"
    if not target.is_file():
        volume = sample.build()
        io.write(volume, target)
    return target


def load_sample(name: str) -> Volume:
    """The sample as a Volume (built and cached on first use)."""
    from . import io

    sample = _get(name)
    vol = io.read(sample_path(name), kind=sample.kind)
    return vol.with_data(vol.data, sample=name, description=sample.description)
