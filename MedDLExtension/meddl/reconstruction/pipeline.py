"""``reconstruct``: k-space file (or :class:`KSpaceData`) -> image volumes, any method, any device."""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, Reporter
from ..volume import Kind, Volume
from . import classical
from .coils import calibration_block, espirit_maps, rss, sense_combine
from .fft import ifft2c
from .kspace import KSpaceData, read_kspace, select_slices
from .masks import MaskType, center_block, default_center_fraction, detect_mask, make_mask, recentre

__all__ = ["Method", "ReconstructionConfig", "ReconstructionResult", "reconstruct", "MODEL_NAME"]

MODEL_NAME = "reconstruction_varnet"


class Method(str, enum.Enum):
    AUTO = "auto"
    VARNET = "varnet"
    ZERO_FILLED = "zero-filled"
    CG_SENSE = "cg-sense"
    L1_WAVELET = "l1-wavelet"
    TV = "tv"


@dataclass(frozen=True)
class ReconstructionConfig:
    """How to reconstruct; CLI flags mirror the fields (``--center-fraction`` ...).

    Attributes:
        method: the reconstruction (:class:`Method`). Default ``auto``: ``varnet`` or ``tv``,
            whichever predicts held-out k-space lines of the file better (:mod:`.select`; ``varnet``
            from 6x on). The bundled variational network has the best SSIM of every method in
            ``docs/benchmarks/reconstruction.md`` at 4x and 8x and is the fastest after zero-filling,
            but on images unlike its brain training set TV can beat it at 4x
            (``docs/benchmarks/reconstruction_robustness.md``); ``tv`` (total-variation compressed
            sensing) is the best classical method. On fully sampled k-space ``auto`` and ``varnet``
            give the direct (zero-filled) reconstruction.
        undersample: retrospectively undersample fully sampled data with this mask type.
        acceleration: for ``undersample`` (default 4).
        center_fraction: for ``undersample`` (default fastMRI's 0.32 / R).
        seed: the retrospective mask's random seed (one mask per volume).
        iterations: solver iterations (classical methods; default per method).
        regularization: lambda of CG-SENSE (Tikhonov) / L1-wavelet / TV, relative to data scaled to max 1.
        uncertainty: also compute a SURE per-pixel error map.
        probes: Monte-Carlo probes for the SURE divergence.
        coil_images: also return the per-coil zero-filled magnitude images.
        phase: also return the phase (radians) of the complex (sensitivity-combined) image.
        combine: coil combination of the zero-filled image (the ``zero-filled`` method and the
            zero-filled companion output): ``rss`` (root sum of squares) or ``sense``
            (sensitivity-weighted with ESPIRiT maps from the calibration region: less noise
            amplification, no RSS bias).
        slices: slice indices to reconstruct (default all).
        repetition: ISMRMRD files: reconstruct this repetition only (``idx.repetition``), as it was
            acquired; default: all repetitions, their lines averaged or merged.
        weights: a VarNet weights file instead of the bundled one.
    """

    method: Method | str = Method.AUTO
    undersample: MaskType | str | None = None
    acceleration: float | None = None
    center_fraction: float | None = None
    seed: int = 0
    iterations: int | None = None
    regularization: float | None = None
    uncertainty: bool = False
    probes: int = 4
    coil_images: bool = False
    phase: bool = False
    combine: str = "rss"
    slices: tuple[int, ...] | None = None
    repetition: int | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise InputError(
                f"--method: expected one of {', '.join(m.value for m in Method)}, got '{self.method}'"
            ) from None
        if self.undersample is not None:
            try:
                object.__setattr__(self, "undersample", MaskType(self.undersample))
            except ValueError:
                raise InputError(
                    f"--undersample: expected one of {', '.join(m.value for m in MaskType)}, got '{self.undersample}'"
                ) from None
        elif self.acceleration is not None or self.center_fraction is not None:
            raise InputError(
                "--acceleration/--center-fraction: expected --undersample with them (they describe a "
                "retrospective mask); the acceleration of undersampled files is detected"
            )
        if self.acceleration is not None and not (np.isfinite(self.acceleration) and self.acceleration >= 1):
            raise InputError(f"--acceleration: expected a number >= 1, got {self.acceleration}")
        if self.center_fraction is not None and not 0 < self.center_fraction < 1:
            raise InputError(f"--center-fraction: expected a fraction in (0, 1), got {self.center_fraction}")
        if self.iterations is not None and self.iterations < 1:
            raise InputError(f"--iterations: expected a positive number, got {self.iterations}")
        if self.regularization is not None and not 0 <= self.regularization < float("inf"):
            raise InputError(f"--regularization: expected a finite number >= 0, got {self.regularization}")
        if self.combine not in ("rss", "sense"):
            raise InputError(f"--combine: expected rss or sense, got '{self.combine}'")
        if self.probes < 1:
            raise InputError(f"--probes: expected a positive number, got {self.probes}")
        if self.slices is not None:
            object.__setattr__(self, "slices", tuple(int(s) for s in self.slices))
        if self.repetition is not None and not (isinstance(self.repetition, (int, np.integer)) and self.repetition >= 0):
            raise InputError(f"--repetition: expected a repetition number >= 0, got {self.repetition!r}")


@dataclass(frozen=True)
class ReconstructionResult:
    """Volumes of shape ``(1, h, w, S)`` (``(C, h, w, S)`` for coil images) on the file's geometry."""

    image: Volume
    zero_filled: Volume
    uncertainty: Volume | None = None
    coil_images: Volume | None = None
    phase: Volume | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _crop(img: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    h, w = img.shape[-2:]
    th, tw = shape
    i0, j0 = (h - th) // 2, (w - tw) // 2
    return img[..., i0 : i0 + th, j0 : j0 + tw]


def _volume(stack: list[np.ndarray], data: KSpaceData, **meta: Any) -> Volume:
    arr = np.stack(stack, axis=-1).astype(np.float32)  # (..., h, w, S)
    if arr.ndim == 3:
        arr = arr[None]
    notice = data.geometry_notice()
    return Volume(arr, data.affine(), Kind.INTENSITY,
                  {"source": data.source, **meta, **({"geometry_notice": notice} if notice else {})})


def _against_reference(images: list[np.ndarray], zero_filled: list[np.ndarray], target: np.ndarray | None
                       ) -> dict[str, Any] | None:
    """SSIM / PSNR / NMSE (fastMRI's conventions) of the result and of the zero-filled image against the
    file's own reference (``reconstruction_rss``), when it has one of the result's size."""
    if target is None:
        return None
    pred = np.stack(images).astype(np.float64)
    ref = np.asarray(target, dtype=np.float64)
    if ref.shape != pred.shape:
        return {"note": f"reference of shape {list(ref.shape)} against a result of {list(pred.shape)}: not compared"}
    from .metrics import nmse, psnr, ssim

    zf = np.stack(zero_filled).astype(np.float64)
    top = float(ref.max())
    return {"ssim": round(ssim(ref, pred, top), 4), "psnr": round(psnr(ref, pred, top), 2),
            "nmse": round(nmse(ref, pred), 5), "zero_filled_ssim": round(ssim(ref, zf, top), 4)}


def reconstruct(
    source: str | os.PathLike | KSpaceData,
    config: ReconstructionConfig | None = None,
    device: Any = "cpu",
    progress: ProgressCallback | Reporter | None = None,
    cancel: CancelToken | None = None,
) -> ReconstructionResult:
    """Reconstruct every (selected) slice of a fastMRI / ISMRMRD file or of :class:`KSpaceData`.

    Returns magnitude volumes ``(1, h, w, S)`` cropped to the header's recon matrix, with
    the geometry from the header's field of view (:meth:`KSpaceData.affine`). A file with a
    reference image (fastMRI's ``reconstruction_rss``) is scored against it:
    ``info["reference"]`` holds SSIM, PSNR and NMSE with fastMRI's conventions.
    """
    config = config or ReconstructionConfig()
    rep = Reporter.of(progress, cancel)
    device = torch.device(device)
    rep(0.0, "reading k-space")
    if isinstance(source, KSpaceData) and config.repetition is not None:
        raise InputError("--repetition: expected a k-space file (repetitions are chosen while reading), got data "
                         "already read")
    data = source if isinstance(source, KSpaceData) else read_kspace(source, config.slices, config.repetition)
    if isinstance(source, KSpaceData) and config.slices is not None:
        data = KSpaceData(
            data.kspace[select_slices(data.slices, config.slices, data.source or "the k-space data")],
            data.header,
            data.mask,
            None,
            data.single_coil,
            data.source,
            data.format,
            data.attrs,
        )
    kspace = data.kspace
    h, w = data.matrix
    found = data.sampling()
    if config.undersample is not None:
        if found.acceleration > 1.01:
            raise InputError(
                f"--undersample: expected fully sampled k-space, got data already undersampled "
                f"(R = {found.acceleration:.2f}); drop --undersample"
            )
        acc = config.acceleration or 4.0
        cf = config.center_fraction or default_center_fraction(acc)
        mask = np.broadcast_to(make_mask(config.undersample, (h, w), acc, cf, config.seed), (h, w))
        kspace = kspace * mask
        sampling = found if config.undersample is MaskType.POISSON else detect_mask(mask[:1])
        acceleration, center_fraction = (h * w) / float(mask.sum()), cf
    else:
        mask = np.broadcast_to(found.mask[None, :], (h, w))
        sampling = found
        acceleration, center_fraction = found.acceleration, found.center_fraction
    undersampled = acceleration > 1.01
    method = Method(config.method)
    requested = method
    if method in (Method.VARNET, Method.AUTO) and not undersampled:
        # nothing is missing: the inverse FFT is exact, and the VarNet (trained to fill in missing lines) would
        # only blur it (0.96 vs 0.99 SSIM on a fully sampled brain slice)
        method = Method.ZERO_FILLED
    # coil maps (ESPIRiT for classical methods, uncertainty and zero-filled phase; the VarNet's own network)
    sense_zf = config.combine == "sense"
    needs_calibration = undersampled and (method is not Method.ZERO_FILLED or config.uncertainty or config.phase
                                          or sense_zf)
    calib = slice(0, w)
    calib_rows = 24
    if needs_calibration:
        if config.undersample is MaskType.POISSON:
            # the Poisson mask's fully sampled calibration square (make_mask's size)
            size = max(4, int(round(cf * min(h, w))))
            calib = center_block(w, size)
            calib_rows = size
        else:
            calib = calibration_block(sampling.mask, f"'{data.source or 'k-space'}'")
    # an energy peak off the centre (a linear phase ramp) is rolled to it: magnitudes are unchanged, and the
    # VarNet, trained on centred k-space, breaks on ramps of a few cycles. The phase output gets the ramp back.
    # Not for 2-D (Poisson) masks, whose calibration square is fixed at the centre.
    shift = (0, 0)
    if config.undersample is not MaskType.POISSON:
        kspace, mask, moved, shift = recentre(kspace, mask, calib if undersampled else None)
        calib = moved if undersampled else calib
    net = None
    card_info: dict[str, Any] = {}
    if method in (Method.VARNET, Method.AUTO):
        from .. import models

        net, card = models.load_model(MODEL_NAME, config.weights, device,
                                       architecture="meddl.reconstruction.varnet:VarNet")
        card_info = {"model": card.name, "model_sha256": card.sha256[:12]}
    mask_t = torch.from_numpy(np.array(mask, dtype=bool)).to(device)
    auto: dict[str, Any] = {}
    if method is Method.AUTO:
        from .select import choose_method

        if config.undersample is MaskType.POISSON:  # no columns to hold out
            chosen, auto = "varnet", {"rule": "a 2-D (Poisson) mask: the VarNet"}
        else:
            # the rule's threshold is for the nominal acceleration: a retrospective 6x mask realises 5.8-5.9
            nominal = float(config.acceleration or 4.0) if config.undersample is not None else acceleration
            chosen, auto = choose_method(kspace, np.asarray(mask)[0], calib, calib_rows, nominal, net, device,
                                         lam=config.regularization, iterations=config.iterations,
                                         progress=rep.stage(0.0, 0.05), slice_numbers=config.slices)
        method = Method(chosen)
    iters = config.iterations or classical.DEFAULT_ITERATIONS.get(method.value, 0)
    lam = classical.DEFAULT_LAMBDA.get(method.value, 0.0) if config.regularization is None else config.regularization
    gen = torch.Generator().manual_seed(config.seed)
    ramp = None  # the image-domain factor that the roll removed: the original image = the result * ramp
    if config.phase and shift != (0, 0):
        delta = torch.zeros((h, w), dtype=torch.complex64)
        delta[(h // 2 - shift[0]) % h, (w // 2 - shift[1]) % w] = 1.0
        ramp = (ifft2c(delta) * float(np.sqrt(h * w))).to(device)
    images, zfs, uncs, coils, phases = [], [], [], [], []
    seconds = []
    shape = data.image_shape
    n = data.slices
    for s in range(n):
        rep(0.05 + 0.9 * s / n, f"slice {s + 1}/{n}")
        t0 = time.perf_counter()
        k = torch.from_numpy(np.ascontiguousarray(kspace[s])).to(device)
        scale = classical.normalisation(k)
        k = k / scale
        maps = None
        if (
            method in (Method.CG_SENSE, Method.L1_WAVELET, Method.TV)
            or config.uncertainty
            or (config.phase and method is Method.ZERO_FILLED)
            or sense_zf
        ):
            maps = espirit_maps(k, calib_width=calib_rows, calib_cols=calib, crop=0.0)

        def solve(kk: torch.Tensor, maps: torch.Tensor | None = maps) -> torch.Tensor:
            """The complex image of a classical method."""
            if method is Method.CG_SENSE:
                return classical.cg_sense(kk, maps, mask_t, iterations=iters, lam=lam)
            if method is Method.L1_WAVELET:
                return classical.l1_wavelet(kk, maps, mask_t, lam=lam, iterations=iters)
            return classical.tv_cs(kk, maps, mask_t, lam=lam, iterations=iters)

        def combined(coil_images: torch.Tensor, maps: torch.Tensor | None = maps) -> torch.Tensor:
            """The zero-filled magnitude (``--combine``)."""
            return sense_combine(coil_images, maps).abs() if sense_zf else rss(coil_images)

        def run(kk: torch.Tensor, maps: torch.Tensor | None = maps) -> torch.Tensor:
            if method is Method.ZERO_FILLED:
                return combined(ifft2c(kk), maps)
            if method is Method.VARNET:
                with torch.no_grad():
                    return net(kk[None], mask_t)[0]
            return solve(kk, maps).abs()

        complex_out = None
        if method in (Method.CG_SENSE, Method.L1_WAVELET, Method.TV):
            complex_out = solve(k)
            out = complex_out.abs()
        else:
            out = run(k)
        seconds.append(time.perf_counter() - t0)
        images.append((_crop(out, shape) * scale).cpu().numpy())
        if config.phase:
            if method is Method.VARNET:
                with torch.no_grad():
                    complex_out = net.complex_image(k[None], mask_t)[0]
            elif method is Method.ZERO_FILLED:
                complex_out = sense_combine(ifft2c(k), maps)
            phases.append(_crop(torch.angle(complex_out if ramp is None else complex_out * ramp), shape).cpu().numpy())
        coil_imgs = ifft2c(k)
        zf = out if method is Method.ZERO_FILLED else combined(coil_imgs)  # the zero-filled method's result is it
        zfs.append((_crop(zf, shape) * scale).cpu().numpy())
        if config.coil_images:
            coils.append((_crop(coil_imgs.abs(), shape) * scale).cpu().numpy())
        if config.uncertainty:
            rep(0.05 + 0.9 * (s + 0.5) / n, f"uncertainty {s + 1}/{n}")
            from .uncertainty import sure_map

            unc = sure_map(run, k, mask_t, maps, probes=config.probes, generator=gen, output=out)
            uncs.append((_crop(unc, shape) * scale).cpu().numpy())
    rep(0.97, "assembling volumes")
    info = {
        "method": method.value,
        "acceleration": round(float(acceleration), 3),
        "center_fraction": round(float(center_fraction), 4),
        "retrospective": config.undersample.value if config.undersample is not None else None,
        "slices": n,
        "coils": data.coils,
        "seconds_per_slice": round(float(np.mean(seconds)), 4),
        "device": str(device),
    } | card_info
    notices = [data.attrs["notice"]] if data.attrs.get("notice") else []  # what the reader merged or assumed
    if auto:
        info["requested_method"] = requested.value
        info["auto"] = auto
        errors = auto.get("heldout_error")
        notices.append(f"auto: {method.value} (" + (
            f"relative error on {auto['heldout_columns']} held-out k-space lines: VarNet {errors['varnet']:.3g}, "
            f"TV {errors['tv']:.3g}" if errors else auto["rule"]) + ")")
    elif method is not requested:
        info["requested_method"] = requested.value
        notices.append(f"k-space is fully sampled: wrote the direct reconstruction (inverse FFT, "
                       f"{'sensitivity-weighted' if sense_zf else 'root-sum-of-squares'} coil combination), not "
                       f"'{requested.value}': the VarNet and compressed sensing fill in missing lines, and none "
                       "are missing; --undersample equispaced --acceleration 4 tries them on this file")
    if shift != (0, 0):
        info["kspace_recentred"] = list(shift)
        notices.append(f"k-space energy peak {-shift[0]:+d} rows, {-shift[1]:+d} columns off the centre "
                       "(a linear phase ramp): rolled to the centre before reconstructing (magnitudes unchanged)")
    if notices:
        info["notice"] = "; ".join(notices)
    scored = _against_reference(images, zfs, data.target)
    if scored is not None:
        info["reference"] = scored
    meta = {"method": method.value, "acceleration": info["acceleration"]}
    result = ReconstructionResult(
        image=_volume(images, data, **meta),
        zero_filled=_volume(zfs, data, method="zero-filled", acceleration=info["acceleration"]),
        uncertainty=_volume(uncs, data, **meta, quantity="SURE estimated RMS error") if uncs else None,
        coil_images=_volume(coils, data, quantity="zero-filled coil magnitude") if coils else None,
        phase=_volume(phases, data, **meta, quantity="phase", unit="rad") if phases else None,
        info=info,
    )
    rep(1.0, "done")
    return result
