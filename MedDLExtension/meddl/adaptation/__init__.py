"""Domain adaptation: stain normalisation of histology and Fourier adaptation of any volume.

Entry points (all take a :class:`~meddl.volume.Volume`, a frozen config, ``progress``, ``cancel``
and ``device``):

* :func:`adapt_stain` - Macenko, Reinhard or Vahadane normalisation of an RGB image to a
  reference (:class:`StainConfig`); :func:`adapt_stain_tiff` streams a TIFF slide of any size;
  :func:`separate_stains` gives H, E (and DAB) concentration volumes; :func:`hed_jitter` is the
  HED colour augmentation for training pipelines; :func:`tissue_mask`.
* :func:`adapt_fourier` - Fourier domain adaptation (FDA, square or circular window, 2D or 3D,
  several references) (:class:`FourierConfig`); :func:`rank_donors` orders references by
  similarity; :func:`fda` is the tensor-level core.
* Baselines: :func:`histogram_match`, :func:`align_class_statistics`.
"""

from .baselines import align_class_statistics, histogram_match
from .fourier import (
    Combine,
    FourierConfig,
    FourierDomain,
    FourierMode,
    Window,
    adapt_fourier,
    default_beta,
    fda,
    rank_donors,
)
from .stain import (
    Separation,
    StainConfig,
    StainFit,
    StainMethod,
    StainNormalizer,
    TissueDetector,
    adapt_stain,
    hed_jitter,
    separate_stains,
    tissue_mask,
)
from .tiling import adapt_stain_tiff

__all__ = [
    "adapt_stain",
    "adapt_stain_tiff",
    "separate_stains",
    "hed_jitter",
    "tissue_mask",
    "StainNormalizer",
    "StainConfig",
    "StainFit",
    "StainMethod",
    "TissueDetector",
    "Separation",
    "adapt_fourier",
    "fda",
    "rank_donors",
    "default_beta",
    "FourierConfig",
    "Window",
    "FourierMode",
    "FourierDomain",
    "Combine",
    "histogram_match",
    "align_class_statistics",
]
