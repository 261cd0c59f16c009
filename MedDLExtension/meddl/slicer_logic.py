"""The Logic of the four Slicer modules: scene nodes in, the ``meddl`` command out of process, nodes back.

Each Logic writes its input nodes to files in a private temporary folder
(:func:`meddl.mrml.node_to_volume` / :func:`~meddl.mrml.segmentation_node_to_labels`, then
:func:`meddl.io.write`), builds the ``meddl`` command line, runs it with a
:class:`~meddl.runner.ProcessRunner` (``--progress json``), and on success reads the outputs
back into the scene (:func:`meddl.mrml.volume_to_node`, ``displacement_to_transform_node``,
``labels_to_segmentation_node``, ``volumes_to_sequence_node``). The process's ``error:`` line
becomes a :class:`~meddl.runner.ProcessError`; a cancel becomes :class:`~meddl.errors.Cancelled`.
Input nodes are never modified; the temporary folder is always removed.

Importable without the Slicer application: MRML is reached only through :mod:`meddl.mrml`
(imported when a run starts; the ``slicer-core`` wheel is enough) and nothing here imports Qt.
The runner is a constructor argument, so tests drive the Logic with a fake ``meddl`` program.

Every Logic has ``start(...) -> Job`` (non-blocking: the Slicer widget calls ``job.poll()``
from a timer) and ``run(...)`` (blocking: ``start(...).wait()``).

Output arguments take ``True`` (make a new node), ``False``/``None`` (do not make this output)
or an existing node (fill that node; it must not be one of the inputs).
"""

from __future__ import annotations

import enum
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from .device import DeviceName
from .errors import InputError, MedDLError
from .runner import LogCallback, ProcessResult, ProcessRunner, ProgressCallback

__all__ = [
    "Job",
    "MedDLLogic",
    "RegistrationLogic",
    "RegistrationResult",
    "ReconstructionLogic",
    "ReconstructionResult",
    "AdaptationLogic",
    "AdaptationResult",
    "InContextSegmentationLogic",
    "SegmentationResult",
    "RegistrationMethod",
    "Similarity",
    "Prealignment",
    "ReconstructionMethod",
    "Undersampling",
    "AdaptMode",
    "StainMethod",
    "FourierWindow",
    "FourierDomain",
    "SegmentOutput",
    "IN_CONTEXT_TASKS",
    "IN_CONTEXT_ALIGN",
    "SEGMENTATION_TASK",
    "choices",
]

T = TypeVar("T")
log = logging.getLogger(__name__)
#: Extension of every file exchanged with the process: NRRD keeps vector/RGB pixels, any dtype and oblique grids.
_EXT = ".nrrd"


# -- options ------------------------------------------------------------------------------------


class RegistrationMethod(str, enum.Enum):
    NETWORK_AND_OPTIMISATION = "network+optimisation"
    NETWORK = "network"
    OPTIMISATION = "optimisation"


class Prealignment(str, enum.Enum):
    AFFINE = "affine"
    CENTER = "center"
    NONE = "none"


class Similarity(str, enum.Enum):
    LNCC = "lncc"
    MI = "mi"
    MIND = "mind"
    DEEPSIM = "deepsim"


class ReconstructionMethod(str, enum.Enum):
    AUTO = "auto"
    VARNET = "varnet"
    ZERO_FILLED = "zero-filled"
    CG_SENSE = "cg-sense"
    L1_WAVELET = "l1-wavelet"
    TV = "tv"


class Undersampling(str, enum.Enum):
    EQUISPACED = "equispaced"
    RANDOM = "random"
    POISSON = "poisson"  #: 2-D variable-density Poisson disc


class AdaptMode(str, enum.Enum):
    STAIN = "stain"
    FOURIER = "fourier"
    HISTOGRAM = "histogram"  #: the baseline: SimpleITK histogram matching to one reference
    CLASSWISE = "classwise"  #: the baseline: per-class mean / std alignment (needs both images' labels)


class StainMethod(str, enum.Enum):
    MACENKO = "macenko"
    REINHARD = "reinhard"
    VAHADANE = "vahadane"


class StainSeparation(str, enum.Enum):
    """Stain vectors of the concentration maps (the command's ``--separation``)."""

    HED = "hed"  #: fixed H, E and DAB vectors (Ruifrok and Johnston)
    MACENKO = "macenko"
    VAHADANE = "vahadane"


class FourierWindow(str, enum.Enum):
    CIRCLE = "circle"
    SQUARE = "square"


class FourierDomain(str, enum.Enum):
    INTENSITY = "intensity"
    LOG = "log"


#: the in-context task whose examples and result are label maps; the others map images to images
SEGMENTATION_TASK = "segmentation"
#: the ``--task`` values of ``meddl segment`` (meddl.incontext's Task, kept here so that the Logic
#: never imports torch in the Slicer process)
IN_CONTEXT_TASKS = (SEGMENTATION_TASK, "denoise", "skullstrip", "bias", "inpaint", "superres", "image")
#: the ``--align`` values of ``meddl segment`` (meddl.incontext's ALIGN_MODES, same reason)
IN_CONTEXT_ALIGN = ("auto", "affine", "center", "deformable", "none")


class SegmentOutput(str, enum.Enum):
    """Where an in-context segmentation goes."""

    NEW_SEGMENT = "new segment"  #: added to a segmentation (the annotated one by default)
    REPLACE_SEGMENT = "replace segment"  #: replaces the content of the annotated segment
    NEW_VOLUME = "new volume"  #: a label map volume


def choices(enum_type: type[enum.Enum]) -> list[str]:
    """The values of an option enum, for combo boxes and parameter-node validators."""
    return [str(member.value) for member in enum_type]


def _choice(value: Any, allowed: Sequence[str], what: str) -> str:
    text = str(value).strip()
    if text not in allowed:
        raise InputError(f"{what}: expected one of {', '.join(allowed)}, got {value!r}")
    return text


def _option(enum_type: type[enum.Enum], value: Any, what: str) -> str:
    try:
        return str(enum_type(value.value if isinstance(value, enum.Enum) else value).value)
    except ValueError:
        raise InputError(f"{what}: expected one of {', '.join(choices(enum_type))}, got {value!r}") from None


# -- jobs ---------------------------------------------------------------------------------------


class Job(Generic[T]):
    """One background run: inputs already written, the process running, outputs imported once.

    ``poll()`` returns True once the job has ended (call it from a timer); ``result()`` then gives
    the outputs or raises the error. ``wait()`` blocks; ``cancel()`` kills the process tree.
    The temporary folder is removed when the job ends, whatever the outcome.
    """

    def __init__(
        self,
        what: str,
        runner: ProcessRunner,
        args: Sequence[str],
        workdir: Path,
        importer: Callable[[ProcessResult], T],
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        keep_files: bool = False,
    ) -> None:
        self.what = what
        self.runner = runner
        self.args = [str(a) for a in args]
        self.workdir = workdir
        self._importer = importer
        self._on_progress = on_progress
        self._on_log = on_log
        self._keep_files = keep_files
        self._done = False
        self._outputs: T | None = None
        self._error: BaseException | None = None
        self.process: ProcessResult | None = None

    def start(self) -> Job[T]:
        try:
            self.runner.start(self.args, self._on_progress, self._on_log)
        except BaseException:
            self._cleanup()
            raise
        return self

    @property
    def done(self) -> bool:
        return self._done

    @property
    def error(self) -> BaseException | None:
        return self._error

    def poll(self) -> bool:
        """Forward new output to the callbacks; True once the job has ended (success or not)."""
        if self._done:
            return True
        result = self.runner.poll()
        if result is None:
            return False
        self._complete(result)
        return True

    def wait(self, timeout: float | None = None) -> T:
        """Block until the job ends and return its outputs (or raise its error)."""
        if not self._done:
            self._complete(self.runner.wait(timeout))
        return self.result()

    def cancel(self) -> None:
        """Kill the process tree; the job then ends with :class:`~meddl.errors.Cancelled`."""
        if not self._done:
            self.runner.cancel()

    def result(self) -> T:
        if not self._done:
            raise MedDLError(f"{self.what}: the job is still running")
        if self._error is not None:
            raise self._error
        return self._outputs  # type: ignore[return-value]

    def _complete(self, result: ProcessResult) -> None:
        self.process = result
        try:
            result.raise_for_status(self.what)
            if self._on_progress is not None:
                self._on_progress(1.0, "loading results into the scene")
            self._outputs = self._importer(result)
        except Exception as exc:  # kept for result(): poll() runs in a timer and must not raise
            if isinstance(exc, OSError):
                exc = MedDLError(f"{self.what}: cannot read the results ({exc})")
            self._error = exc
        finally:
            self._done = True
            self._cleanup()

    def _cleanup(self) -> None:
        if not self._keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)


# -- shared Logic -------------------------------------------------------------------------------


class MedDLLogic:
    """What the four Logics share: scene, runner, temporary files, common flags.

    Each ``start`` / ``run`` also takes any other option of its command by its long name
    (``iterations=30`` -> ``--iterations 30``; see :meth:`_options`); the command checks them.

    Args:
        scene: the ``vtkMRMLScene`` results go into (default: the scene of the first input node).
        runner: runs the ``meddl`` command; default ``ProcessRunner()`` (``python -m meddl``,
            ``PythonSlicer -m meddl`` inside Slicer). Tests pass a runner around a fake program.
        temp_root: parent folder of the per-run temporary folders (default: the system's).
        keep_files: keep the temporary folder (to debug a run).
    """

    command: ClassVar[str] = ""

    def __init__(
        self,
        scene: Any = None,
        runner: ProcessRunner | None = None,
        temp_root: str | Path | None = None,
        keep_files: bool = False,
    ) -> None:
        self.scene = scene
        self.runner = runner if runner is not None else ProcessRunner()
        self.temp_root = temp_root
        self.keep_files = keep_files

    def run(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Blocking: ``start(...)`` then ``wait()``; returns the result dataclass."""
        return self.start(*args, **kwargs).wait(timeout)

    def start(self, *args: Any, **kwargs: Any) -> Job:  # pragma: no cover - each Logic defines it
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------
    @staticmethod
    def _mrml():
        from . import mrml  # lazily: needs the slicer-core wheel or the Slicer application

        return mrml

    def _scene_for(self, node: Any) -> Any:
        scene = self.scene if self.scene is not None else node.GetScene()
        if scene is None:
            raise InputError(f"meddl {self.command}: the input node '{node.GetName()}' is not in a scene")
        return scene

    def _workdir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"meddl-{self.command}-", dir=self.temp_root))

    def _write_volume(self, node: Any, path: Path, role: str, kind: str | None = None) -> Path:
        from . import io

        if node is None:
            raise InputError(f"meddl {self.command}: the {role} is not set")
        volume = self._mrml().node_to_volume(node, kind=kind)
        if "parent_transform" in volume.meta:
            log.warning("meddl %s: the %s '%s' is under a transform, which is not applied; harden it first "
                        "to use the transformed position", self.command, role, node.GetName())
        io.write(volume, path, compress=False)
        return path

    def _write_labels(self, node: Any, path: Path, role: str, reference: Any = None,
                      segment_ids: Sequence[str] | None = None, known: list | None = None) -> list:
        """Export ``node`` to a label map at ``path``; its segments. With ``known`` (the segments of
        earlier examples), segments are matched by name: a name seen before gets that label value,
        a new one the next free value, and the union is returned."""
        from . import io

        labels, segments = self._mrml().segmentation_node_to_labels(node, reference=reference, segment_ids=segment_ids)
        if not segments:
            raise InputError(f"meddl {self.command}: the {role} '{node.GetName()}' has no segments to use")
        segments = list(segments)
        if known is not None:
            labels, segments = _match_segments_by_name(labels, segments, known)
        io.write(labels, path, compress=False)
        return segments

    def _flags(self, device: Any, seed: int | None, options: Mapping[str, Any] | None = None) -> list[str]:
        flags = ["--device", _option(DeviceName, device, "device"), "--progress", "json"]
        if seed is not None:
            flags += ["--seed", str(int(seed))]
        return flags + self._options(options or {})

    def _options(self, options: Mapping[str, Any]) -> list[str]:
        """Any other option of the command, by its long name: ``iterations=30`` -> ``--iterations 30``,
        ``True`` -> the flag alone, ``False`` / ``None`` -> left out, a list -> several values. Options
        naming the files the Logic writes and reads itself are refused."""
        argv: list[str] = []
        for name, value in options.items():
            flag = "--" + name.replace("_", "-")
            if name in _MANAGED_OPTIONS:
                raise InputError(f"meddl {self.command}: option '{name}' is set by the Logic itself (nodes in, "
                                 "nodes out); use its own argument")
            if value is None or value is False:
                continue
            if value is True:
                argv.append(flag)
            elif isinstance(value, (list, tuple)):
                argv += [flag, *(str(v) for v in value)]
            else:
                argv += [flag, str(value)]
        return argv

    @staticmethod
    def _refuse_overwriting_inputs(inputs: Sequence[Any], outputs: dict[str, Any]) -> None:
        nodes = [(role, n) for role, n in outputs.items() if n is not None and not isinstance(n, bool)]
        for i, (first, a) in enumerate(nodes):  # one node for two outputs: the last written would win
            for role, b in nodes[i + 1:]:
                if a is b or (a.GetID() and a.GetID() == b.GetID()):
                    raise InputError(f"{role}: expected another node than the {first}, got '{b.GetName()}' for both")
        for role, target in outputs.items():
            if target is None or isinstance(target, bool):
                continue
            if any(n is not None and (n is target or (n.GetID() and n.GetID() == target.GetID())) for n in inputs):
                raise InputError(
                    f"{role}: expected a new or another node, got the input node '{target.GetName()}'; "
                    "inputs are never overwritten"
                )

    def _launch(self, what: str, args: list[str], workdir: Path, importer: Callable[[ProcessResult], T],
                progress: ProgressCallback | None, log: LogCallback | None) -> Job[T]:
        return Job(what, self.runner, args, workdir, importer, progress, log, self.keep_files).start()


#: options whose values are the files a Logic writes and reads, or that it sets itself
_MANAGED_OPTIONS = frozenset({
    "o", "output", "transform", "jacobian", "inverse", "moving_labels", "labels_out", "uncertainty", "zero_filled",
    "coils_out", "phase", "stains_out", "annotated", "context", "progress", "device", "seed", "debug",
})


def _wanted(target: Any) -> bool:
    return target is not None and target is not False


def _match_segments_by_name(labels: Any, found: list, known: list) -> tuple[Any, list]:
    """``labels`` (a label Volume with segments ``found``) renumbered so that a segment named like
    one of ``known`` takes its value and a new name the smallest value not yet used; returns the
    renumbered labels and ``known`` plus the new segments (examples exported one by one number
    their untagged segments in their own order, so liver can be 1 in one and 2 in the next)."""
    import dataclasses

    import numpy as np

    union = list(known)
    value_of = {s.name: s.label for s in union}
    used = {s.label for s in union}
    mapping: dict[int, int] = {}
    for seg in found:
        if seg.name not in value_of:
            new = seg.label if seg.label not in used else min(set(range(1, len(used) + 2)) - used)
            value_of[seg.name] = new
            used.add(new)
            union.append(dataclasses.replace(seg, label=new))
        mapping[seg.label] = value_of[seg.name]
    if all(old == new for old, new in mapping.items()):
        return labels, union
    arr = labels.numpy()[0]
    out = np.zeros(arr.shape, np.int32)
    for old, new in mapping.items():
        out[arr == old] = new
    return labels.with_data(out[None]), union


def _existing(target: Any) -> Any:
    """The node to fill, or None for a new node."""
    return None if target is None or isinstance(target, bool) else target


def _fill(mrml: Any, volume: Any, scene: Any, name: str, target: Any) -> Any:
    """``volume`` into the output node ``target`` when it is the kind of node the result needs, else
    into a new node: a node left by an earlier run of another kind (a grey volume for an RGB result, a
    label map for an image) is not an error found only after the whole computation."""
    node = _existing(target)
    return mrml.volume_to_node(volume, scene, name=name, node=node if node is None or mrml.node_fits(volume, node)
                               else None)


def _prepare(logic: MedDLLogic, build: Callable[[Path], T]) -> tuple[Path, T]:
    """Make the temporary folder and write the inputs; remove the folder if writing fails."""
    workdir = logic._workdir()
    try:
        return workdir, build(workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


# -- registration -------------------------------------------------------------------------------


@dataclass
class RegistrationResult:
    """Nodes filled by a registration (``None`` where that output was not asked for)."""

    warped: Any
    transform: Any = None
    jacobian: Any = None
    warped_segmentation: Any = None
    inverse_transform: Any = None
    process: ProcessResult | None = field(default=None, repr=False)


class RegistrationLogic(MedDLLogic):
    """``meddl register``: deformable registration of a moving volume onto a fixed volume."""

    command = "register"

    def start(
        self,
        fixed: Any,
        moving: Any,
        moving_segmentation: Any = None,
        *,
        method: str = RegistrationMethod.NETWORK_AND_OPTIMISATION,
        similarity: str = Similarity.LNCC,
        prealignment: str = Prealignment.AFFINE,
        device: str = "auto",
        seed: int | None = None,
        warped: Any = True,
        transform: Any = True,
        jacobian: Any = False,
        warped_segmentation: Any = True,
        inverse_transform: Any = False,
        progress: ProgressCallback | None = None,
        log: LogCallback | None = None,
        **options: Any,
    ) -> Job[RegistrationResult]:
        """Start registering ``moving`` onto ``fixed`` (scalar volume nodes).

        ``moving_segmentation`` (optional) is warped with the same transform into
        ``warped_segmentation``. The transform node holds the displacement field (Slicer's
        "from parent" direction): applied to ``moving`` it aligns it with ``fixed``.
        ``prealignment`` (the command's ``--affine``): ``affine``, ``center`` (centre of mass) or
        ``none`` (trust the scanner coordinates). ``inverse_transform`` (the command's ``--inverse``):
        the transform the other way (fixed -> moving images: it aligns ``fixed`` with ``moving``).
        """
        if fixed is None or moving is None:
            raise InputError("meddl register: expected a fixed and a moving volume node, got "
                             f"fixed={getattr(fixed, 'GetName', lambda: None)()}, "
                             f"moving={getattr(moving, 'GetName', lambda: None)()}")
        method = _option(RegistrationMethod, method, "registration method")
        similarity = _option(Similarity, similarity, "similarity")
        prealignment = _option(Prealignment, prealignment, "pre-alignment")
        flags = self._flags(device, seed, options)
        with_labels = moving_segmentation is not None and _wanted(warped_segmentation)
        self._refuse_overwriting_inputs(
            (fixed, moving, moving_segmentation),
            {"warped volume": warped, "transform": transform, "Jacobian volume": jacobian,
             "warped segmentation": warped_segmentation, "inverse transform": inverse_transform},
        )
        scene = self._scene_for(fixed)

        def build(d: Path) -> tuple[list[str], list]:
            args = ["register", self._write_volume(fixed, d / f"fixed{_EXT}", "fixed volume"),
                    self._write_volume(moving, d / f"moving{_EXT}", "moving volume"),
                    "-o", d / f"warped{_EXT}", "--method", method, "--similarity", similarity,
                    "--affine", prealignment]
            if _wanted(transform):
                args += ["--transform", d / "transform.h5"]
            if _wanted(jacobian):
                args += ["--jacobian", d / f"jacobian{_EXT}"]
            if _wanted(inverse_transform):
                args += ["--inverse", d / "inverse.h5"]
            segments: list = []
            if with_labels:
                segments = self._write_labels(moving_segmentation, d / f"moving-labels{_EXT}",
                                              "moving segmentation", reference=moving)
                args += ["--moving-labels", d / f"moving-labels{_EXT}", "--labels-out", d / f"warped-labels{_EXT}"]
            return [str(a) for a in args] + flags, segments

        workdir, (args, segments) = _prepare(self, build)
        base = moving.GetName()

        def importer(process: ProcessResult) -> RegistrationResult:
            from . import io, transforms

            mrml = self._mrml()
            out = RegistrationResult(
                warped=_fill(mrml, io.read(workdir / f"warped{_EXT}"), scene, f"{base} warped", warped),
                process=process,
            )
            if _wanted(transform):
                out.transform = mrml.displacement_to_transform_node(
                    transforms.read_transform(workdir / "transform.h5"), scene,
                    name=f"{base} to {fixed.GetName()}", node=_existing(transform))
            if _wanted(inverse_transform):
                out.inverse_transform = mrml.displacement_to_transform_node(
                    transforms.read_transform(workdir / "inverse.h5"), scene,
                    name=f"{fixed.GetName()} to {base}", node=_existing(inverse_transform))
            if _wanted(jacobian):
                out.jacobian = _fill(mrml, io.read(workdir / f"jacobian{_EXT}"), scene,
                                     f"{base} Jacobian determinant", jacobian)
            if with_labels:
                out.warped_segmentation = mrml.labels_to_segmentation_node(
                    io.read(workdir / f"warped-labels{_EXT}", kind="label"), scene, segments=segments,
                    name=f"{moving_segmentation.GetName()} warped",
                    node=_existing(warped_segmentation))
            return out

        return self._launch("meddl register", args, workdir, importer, progress, log)


# -- reconstruction -----------------------------------------------------------------------------


@dataclass
class ReconstructionResult:
    """Nodes filled by a reconstruction (``None`` where that output was not asked for)."""

    reconstruction: Any
    zero_filled: Any = None
    uncertainty: Any = None
    phase: Any = None  #: radians, of the complex image
    coil_images: Any = None  #: a sequence node, one volume per coil
    process: ProcessResult | None = field(default=None, repr=False)


class ReconstructionLogic(MedDLLogic):
    """``meddl reconstruct``: an image from a raw multi-coil k-space file (fastMRI/ISMRMRD HDF5)."""

    command = "reconstruct"

    def start(
        self,
        kspace_path: str | Path,
        *,
        method: str = ReconstructionMethod.AUTO,
        undersampling: str | None = None,
        acceleration: float = 4.0,
        center_fraction: float | None = None,
        device: str = "auto",
        seed: int | None = None,
        reconstruction: Any = True,
        zero_filled: Any = False,
        uncertainty: Any = False,
        phase: Any = False,
        coil_images: bool = False,
        repetition: int | None = None,
        scene: Any = None,
        progress: ProgressCallback | None = None,
        log: LogCallback | None = None,
        **options: Any,
    ) -> Job[ReconstructionResult]:
        """Start reconstructing ``kspace_path``.

        ``undersampling`` (``"equispaced"``/``"random"``) retrospectively undersamples fully
        sampled data by ``acceleration``, keeping ``center_fraction`` of the central lines (None:
        the command's default, fastMRI's 0.32 / acceleration).
        ``zero_filled``, ``phase`` and ``coil_images`` need the command's ``--zero-filled``,
        ``--phase`` (radians) and ``--coil-images`` outputs (the latter a multi-channel image,
        one channel per coil). ``repetition``: an ISMRMRD file's repetition to reconstruct as
        acquired (None: all, their lines averaged or merged).
        """
        path = Path(kspace_path) if kspace_path else None
        if path is None or not path.is_file():
            raise InputError(f"meddl reconstruct: expected an existing k-space file (.h5, or BART .cfl), got '{kspace_path or ''}'")
        method = _option(ReconstructionMethod, method, "reconstruction method")
        scene = scene if scene is not None else self.scene
        if scene is None:
            raise InputError("meddl reconstruct: no scene to put the results in; pass scene=")
        flags = self._flags(device, seed, options)
        if undersampling:
            undersampling = _option(Undersampling, undersampling, "undersampling")
            if not acceleration or float(acceleration) < 1:
                raise InputError(f"acceleration: expected a factor >= 1, got {acceleration}")
            if center_fraction is not None and not 0 < float(center_fraction) < 1:
                raise InputError(f"centre fraction: expected a value between 0 and 1, got {center_fraction}")

        def build(d: Path) -> list[str]:
            args: list[Any] = ["reconstruct", path, "-o", d / f"reconstruction{_EXT}", "--method", method]
            if undersampling:
                args += ["--undersample", undersampling, "--acceleration", f"{float(acceleration):g}"]
                if center_fraction is not None:
                    args += ["--center-fraction", f"{float(center_fraction):g}"]
            if _wanted(uncertainty):
                args += ["--uncertainty", d / f"uncertainty{_EXT}"]
            if _wanted(zero_filled):
                args += ["--zero-filled", d / f"zero-filled{_EXT}"]
            if _wanted(phase):
                args += ["--phase", d / f"phase{_EXT}"]
            if coil_images:
                args += ["--coil-images", d / f"coils{_EXT}"]
            if repetition is not None:
                args += ["--repetition", int(repetition)]
            return [str(a) for a in args] + flags

        workdir, args = _prepare(self, build)
        base = path.name.split(".")[0]

        def importer(process: ProcessResult) -> ReconstructionResult:
            from . import io

            mrml = self._mrml()

            def volume(stem: str, label: str, target: Any) -> Any:
                return _fill(mrml, io.read(workdir / f"{stem}{_EXT}"), scene, f"{base} {label}", target)

            ran = (process.summary or {}).get("method") or method  # auto: the method it chose
            out = ReconstructionResult(volume("reconstruction", ran, reconstruction), process=process)
            if _wanted(zero_filled):
                out.zero_filled = volume("zero-filled", "zero-filled", zero_filled)
            if _wanted(uncertainty):
                out.uncertainty = volume("uncertainty", "uncertainty", uncertainty)
            if _wanted(phase):
                out.phase = volume("phase", "phase", phase)
            if coil_images:
                coils = io.read(workdir / f"coils{_EXT}")
                per_coil = [coils.with_data(coils.numpy()[c:c + 1]) for c in range(coils.channels)]
                out.coil_images = mrml.volumes_to_sequence_node(
                    per_coil, scene, name=f"{base} coil images", index_name="coil")
                mrml.browse_sequence(out.coil_images, scene)
            return out

        return self._launch("meddl reconstruct", args, workdir, importer, progress, log)

    @staticmethod
    def header_text(kspace_path: str | Path, max_lines: int = 60) -> str:
        """A readable summary of a k-space file (HDF5, or BART .cfl/.hdr).

        First what the reconstruction will see (:func:`meddl.reconstruction.describe`: coils,
        matrices, field of view, the acceleration and calibration lines found in the sampling
        pattern), then the raw listing: attributes, datasets and the ISMRMRD header.
        """
        path = Path(kspace_path)
        if not str(kspace_path) or path.is_dir():  # nothing chosen yet (the file box starts at ".")
            return "(choose a k-space file: fastMRI or ISMRMRD .h5, or BART .cfl)"
        if not path.is_file():
            return f"(no such file: {path})"
        try:
            import h5py
        except ImportError:
            return "(h5py is not installed: cannot show the header)"
        lines: list[str] = []
        try:
            from .reconstruction.kspace import describe

            info = describe(path)
        except (MedDLError, ImportError, OSError, ValueError, KeyError) as exc:
            lines.append(f"(not readable as k-space: {' '.join(str(exc).split())})")
        else:
            lines += [f"{key}: {value}" for key, value in info.items()]
            lines.append("--")
        from .reconstruction.bart_io import cfl_pair

        bart = cfl_pair(path)
        if bart is not None:  # BART data: its text header is the raw listing
            if bart[0].is_file():
                lines += ["BART header:", *(ln for ln in bart[0].read_text(errors="replace").splitlines() if ln.strip())]
            return "\n".join(lines[:max_lines])
        try:
            with h5py.File(path, "r") as f:
                for key, value in f.attrs.items():
                    lines.append(f"@{key} = {value}")

                def visit(name: str, obj: Any) -> None:
                    if isinstance(obj, h5py.Dataset) and name != "ismrmrd_header":
                        lines.append(f"{name}: shape {tuple(obj.shape)}, {obj.dtype}")

                f.visititems(visit)
                if "ismrmrd_header" in f:
                    raw = f["ismrmrd_header"][()]
                    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                    lines.append("ismrmrd_header:")
                    lines.extend(ln for ln in text.splitlines() if ln.strip())
        except OSError as exc:
            return f"(not a readable HDF5 file: {exc})"
        if len(lines) > max_lines:
            lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
        return "\n".join(lines)


# -- domain adaptation --------------------------------------------------------------------------


@dataclass
class AdaptationResult:
    """Nodes filled by a domain adaptation (``None`` where that output was not asked for)."""

    output: Any
    hematoxylin: Any = None
    eosin: Any = None
    dab: Any = None
    process: ProcessResult | None = field(default=None, repr=False)


class AdaptationLogic(MedDLLogic):
    """``meddl adapt``: stain normalisation or Fourier domain adaptation towards reference images."""

    command = "adapt"

    def start(
        self,
        input_volume: Any,
        references: Sequence[Any],
        *,
        mode: str = AdaptMode.STAIN,
        method: str = StainMethod.MACENKO,
        beta: float | None = None,
        window: str = FourierWindow.CIRCLE,
        domain: str = FourierDomain.INTENSITY,
        device: str = "auto",
        seed: int | None = None,
        output: Any = True,
        hematoxylin: Any = False,
        eosin: Any = False,
        dab: Any = False,
        separation: str | None = None,
        labels: Any = None,
        reference_labels: Any = None,
        progress: ProgressCallback | None = None,
        log: LogCallback | None = None,
        **options: Any,
    ) -> Job[AdaptationResult]:
        """Start adapting ``input_volume`` (scalar or RGB vector volume) to ``references``.

        Stain mode takes exactly one reference and ``method``; it can also give the hematoxylin
        and eosin concentration maps (the command's ``--stains-out``), and the DAB map with
        ``separation="hed"`` (the stain vectors of the maps: ``hed``, ``macenko`` or ``vahadane``;
        ``None``: the method's own, ``hed`` for Reinhard). Fourier mode takes one or
        more references, ``beta`` (the size of the swapped low-frequency window, as a fraction of
        the image, 0-0.5; ``None``: the command's default for the window), the window shape and
        the ``domain`` (``log`` adapts the logarithm: for multiplicative shifts such as bias fields).
        Histogram mode (the baseline users expect) matches the histogram to one reference.
        Classwise mode aligns each class's mean and standard deviation with the reference's: it takes
        ``labels`` (of the input) and ``reference_labels`` (segmentation or label map nodes; segments
        of the two segmentations are the same class when they have the same name).
        """
        if input_volume is None:
            raise InputError("meddl adapt: the input volume is not set")
        references = [r for r in (references or []) if r is not None]
        mode = _option(AdaptMode, mode, "adaptation mode")
        if not references:
            raise InputError("meddl adapt: expected at least one reference volume, got none")
        if mode != AdaptMode.FOURIER.value and len(references) != 1:
            raise InputError(f"meddl adapt {mode}: expected exactly one reference volume, got {len(references)}")
        classwise = mode == AdaptMode.CLASSWISE.value
        if classwise and (labels is None or reference_labels is None):
            raise InputError("meddl adapt classwise: expected the labels of the input and of the reference, got "
                             + ("neither" if labels is None and reference_labels is None else "only one"))
        if not classwise and (labels is not None or reference_labels is not None):
            raise InputError(f"labels: expected classwise mode, got {mode}")
        if mode != AdaptMode.STAIN.value and (_wanted(hematoxylin) or _wanted(eosin) or _wanted(dab)):
            raise InputError(f"hematoxylin/eosin/DAB outputs: expected stain mode, got {mode}")
        if mode == AdaptMode.STAIN.value:
            method = _option(StainMethod, method, "stain method")
            if separation is not None:
                separation = _option(StainSeparation, separation, "stain separation")
            resolved = separation or (StainSeparation.HED.value if method == StainMethod.REINHARD.value else method)
            if _wanted(dab) and resolved != StainSeparation.HED.value:
                raise InputError(f"DAB volume: expected the hed separation (H, E and DAB), got '{resolved}' "
                                 "(H and E only); pass separation='hed'")
        elif mode == AdaptMode.FOURIER.value:
            window = _option(FourierWindow, window, "Fourier window")
            domain = _option(FourierDomain, domain, "Fourier domain")
            if beta is not None and not 0 <= float(beta) <= 0.5:
                raise InputError(f"beta: expected a value in [0, 0.5], got {beta}")
        self._refuse_overwriting_inputs((input_volume, *references, labels, reference_labels),
                                        {"output volume": output, "hematoxylin volume": hematoxylin,
                                         "eosin volume": eosin, "DAB volume": dab})
        flags = self._flags(device, seed, options)
        scene = self._scene_for(input_volume)

        def classes(node: Any, path: Path, role: str, reference: Any, known: list | None) -> tuple[Path, list]:
            if node.IsA("vtkMRMLSegmentationNode"):
                return path, self._write_labels(node, path, role, reference=reference, known=known)
            return self._write_volume(node, path, role, kind="label"), []

        def build(d: Path) -> list[str]:
            args: list[Any] = ["adapt", mode, self._write_volume(input_volume, d / f"input{_EXT}", "input volume")]
            if classwise:
                path, known = classes(labels, d / f"labels{_EXT}", "input labels", input_volume, None)
                args.append(path)
                args.append(self._write_volume(references[0], d / f"reference0{_EXT}", "reference volume"))
                # segments named like the input's take their values (label maps: by value)
                args.append(classes(reference_labels, d / f"reference-labels{_EXT}", "reference labels",
                                    references[0], known or None)[0])
            for i, ref in enumerate(() if classwise else references):
                args.append(self._write_volume(ref, d / f"reference{i}{_EXT}", "reference volume"))
            args += ["-o", d / f"output{_EXT}"]
            if mode == AdaptMode.STAIN.value:
                args += ["--method", method]
                if _wanted(hematoxylin) or _wanted(eosin) or _wanted(dab):
                    args += ["--stains-out", d / "stains"]  # writes stains_H.nrrd, stains_E.nrrd (, _DAB)
                if separation is not None:
                    args += ["--separation", separation]
            elif mode == AdaptMode.FOURIER.value:
                args += ["--window", window, "--domain", domain]
                if beta is not None:
                    args += ["--beta", f"{float(beta):g}"]
            return [str(a) for a in args] + flags

        workdir, args = _prepare(self, build)
        base = input_volume.GetName()

        def importer(process: ProcessResult) -> AdaptationResult:
            from . import io

            mrml = self._mrml()

            def volume(stem: str, label: str, target: Any) -> Any:
                return _fill(mrml, io.read(workdir / f"{stem}{_EXT}"), scene, f"{base} {label}", target)

            out = AdaptationResult(volume("output", "adapted", output), process=process)
            if _wanted(hematoxylin):
                out.hematoxylin = volume("stains_H", "hematoxylin", hematoxylin)
            if _wanted(eosin):
                out.eosin = volume("stains_E", "eosin", eosin)
            if _wanted(dab):
                out.dab = volume("stains_DAB", "DAB", dab)
            return out

        return self._launch(f"meddl adapt {mode}", args, workdir, importer, progress, log)


# -- in-context segmentation --------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """Where the result went: a segmentation node (and the segment IDs written), or a volume node
    (a label map, or the output image of an image-to-image task)."""

    segmentation: Any = None
    segment_ids: list[str] = field(default_factory=list)
    volume: Any = None
    process: ProcessResult | None = field(default=None, repr=False)


class InContextSegmentationLogic(MedDLLogic):
    """``meddl segment``: segment a target from a few painted slices or a few labelled examples.

    Besides ``segmentation``, the in-context network does image-to-image tasks (``denoise``,
    ``skullstrip``, ...) shown by example pairs of volumes; their result is a volume.
    """

    command = "segment"
    #: suffix of the names given to results, so they never collide with what the user painted
    _task_label: ClassVar[str] = "in-context"

    def start(
        self,
        target: Any,
        *,
        segmentation: Any = None,
        segment_id: str | Sequence[str] | None = None,
        context: Sequence[tuple[Any, Any]] = (),
        task: str = "segmentation",
        output_mode: str = SegmentOutput.NEW_SEGMENT,
        output_segmentation: Any = None,
        output_volume: Any = None,
        prior: float | None = None,
        align: str | None = None,
        atlas_prior: float | None = None,
        device: str = "auto",
        seed: int | None = None,
        progress: ProgressCallback | None = None,
        log: LogCallback | None = None,
        **options: Any,
    ) -> Job[SegmentationResult]:
        """Start segmenting ``target`` (a scalar volume node).

        Give either ``segmentation`` with ``segment_id`` (a segment painted on a few slices of
        the target, or a list of segment IDs: every one is propagated, and a slice where any of
        them is painted counts as fully painted) or ``context``: ``(volume node, segmentation node or label map node)`` example
        pairs; for an image task, ``(volume node, output volume node)`` pairs. Segments of different
        example segmentations are the same structure when they have the same name (whatever their
        order); label map examples are taken by value.

        ``output_mode``: ``"new segment"`` adds the result to ``output_segmentation`` (default: the
        painted segmentation, or a new segmentation node); ``"replace segment"`` replaces the
        painted segment(s); ``"new volume"`` fills ``output_volume`` (or a new label map volume).
        An image task always gives a volume (``output_volume`` or a new scalar volume).

        ``prior``: with painted slices, the weight of the interpolation of the painted masks mixed
        with the network (``meddl segment --prior``; None: the command's default, 0.5).

        ``align``: with context examples, how each example is brought onto the target's grid
        (``meddl segment --align``: ``"auto"``, ``"affine"``, ``"center"``, ``"deformable"`` or
        ``"none"``; None: the command's default, auto: deformable for a 2D target, affine for 3D).

        ``atlas_prior``: with context examples of a segmentation task, the weight of the aligned
        examples' own labels mixed with the network (``meddl segment --atlas-prior``; None: the
        command's default, 0.25).
        """
        if target is None:
            raise InputError("meddl segment: the target volume is not set")
        if prior is not None and not 0.0 <= float(prior) <= 1.0:
            raise InputError(f"prior: expected a weight between 0 and 1, got {prior}")
        if align is not None and align not in IN_CONTEXT_ALIGN:
            raise InputError(f"align: expected one of {', '.join(IN_CONTEXT_ALIGN)}, got '{align}'")
        if atlas_prior is not None and not 0.0 <= float(atlas_prior) <= 1.0:
            raise InputError(f"atlas prior: expected a weight between 0 and 1, got {atlas_prior}")
        context = [(v, s) for v, s in (context or []) if v is not None or s is not None]
        annotated = segmentation is not None
        if annotated == bool(context):
            raise InputError("meddl segment: expected either a segmentation painted on the target or context "
                             f"examples, got {'both' if annotated else 'neither'}")
        for i, (vol, seg) in enumerate(context, 1):
            if vol is None or seg is None:
                raise InputError(f"context example {i}: expected a volume and its segmentation, got only one of them")
        task = _choice(task or SEGMENTATION_TASK, IN_CONTEXT_TASKS, "task")
        image_task = task != SEGMENTATION_TASK
        if image_task and annotated:
            raise InputError(f"task '{task}': expected context examples (pairs of volumes), got a painted "
                             "segmentation; painted slices work with the segmentation task")
        segment_ids = [segment_id] if isinstance(segment_id, str) else list(segment_id or [])
        if annotated and not segment_ids:
            raise InputError("meddl segment: expected the painted segment to be chosen, got none")
        for sid in segment_ids if annotated else ():
            if segmentation.GetSegmentation().GetSegment(sid) is None:
                raise InputError(f"segment: expected a segment of '{segmentation.GetName()}', got unknown ID '{sid}'")
        output_mode = SegmentOutput.NEW_VOLUME.value if image_task else _option(SegmentOutput, output_mode, "output")
        if output_mode == SegmentOutput.REPLACE_SEGMENT.value and not annotated:
            raise InputError("output 'replace segment': expected a painted segment to replace, got context examples")
        inputs = (target, segmentation, *(n for pair in context for n in pair))
        self._refuse_overwriting_inputs(
            [n for n in inputs if n is not segmentation],  # the painted segmentation may receive the result
            {"output segmentation": output_segmentation, "output volume": output_volume})
        flags = self._flags(device, seed, options)
        scene = self._scene_for(target)

        def build(d: Path) -> tuple[list[str], list]:
            args: list[Any] = ["segment", self._write_volume(target, d / f"target{_EXT}", "target volume"),
                               "-o", d / f"labels{_EXT}"]
            if annotated:
                segments = self._write_labels(segmentation, d / f"annotated{_EXT}", "painted segmentation",
                                              reference=target, segment_ids=segment_ids)
                args += ["--annotated", d / f"annotated{_EXT}"]
            else:
                args.append("--context")
                segments = []
                for i, (vol, example) in enumerate(context):
                    args.append(self._write_volume(vol, d / f"context{i}{_EXT}", f"context volume {i + 1}"))
                    path = d / f"context{i}-output{_EXT}"
                    if example.IsA("vtkMRMLSegmentationNode"):
                        if image_task:
                            raise InputError(f"context example {i + 1}: task '{task}' expected an output volume, "
                                             f"got the segmentation '{example.GetName()}'")
                        segments = self._write_labels(example, path, f"context segmentation {i + 1}", reference=vol,
                                                      known=segments)
                    else:
                        self._write_volume(example, path, f"context output {i + 1}",
                                           kind=None if image_task else "label")
                    args.append(path)
            args += ["--task", task]
            if prior is not None and annotated:
                args += ["--prior", float(prior)]
            if align is not None and not annotated:
                args += ["--align", align]
            if atlas_prior is not None and not annotated and not image_task:
                args += ["--atlas-prior", float(atlas_prior)]
            return [str(a) for a in args] + flags, segments

        workdir, (args, segments) = _prepare(self, build)

        def importer(process: ProcessResult) -> SegmentationResult:
            from . import io

            if image_task:
                image = io.read(workdir / f"labels{_EXT}")
                node = _fill(self._mrml(), image, scene, f"{target.GetName()} {task}", output_volume)
                return SegmentationResult(volume=node, process=process)
            labels = io.read(workdir / f"labels{_EXT}", kind="label")
            return self._import_labels(labels, segments, scene, target, output_mode,
                                       segmentation, output_segmentation, output_volume, process)

        return self._launch("meddl segment", args, workdir, importer, progress, log)

    def _import_labels(self, labels: Any, segments: list, scene: Any, target: Any, output_mode: str,
                       segmentation: Any, output_segmentation: Any, output_volume: Any,
                       process: ProcessResult) -> SegmentationResult:
        mrml = self._mrml()
        if output_mode == SegmentOutput.NEW_VOLUME.value:
            name = f"{target.GetName()} {self._task_label}"
            node = _fill(mrml, labels, scene, name, output_volume)
            return SegmentationResult(volume=node, process=process)
        replace = output_mode == SegmentOutput.REPLACE_SEGMENT.value
        if replace:
            # each painted segment's label is taken back under that segment's ID
            wanted = [mrml.SegmentInfo(s.label, s.name, tuple(s.color)) for s in segments]
        else:
            # new segments are renamed so that they never collide with what the user painted
            wanted = [mrml.SegmentInfo(s.label, f"{s.name} ({self._task_label})", tuple(s.color)) for s in segments]
        destination = segmentation if replace else (_existing(output_segmentation) or segmentation)
        if destination is None:
            node = mrml.labels_to_segmentation_node(
                labels, scene, segments=wanted, name=f"{target.GetName()} segmentation")
            return SegmentationResult(segmentation=node, segment_ids=mrml.segment_ids(node), process=process)
        # labels_to_segmentation_node replaces every segment of a node it fills, so the result is
        # imported into a scratch node and only its segments are copied over.
        scratch = mrml.labels_to_segmentation_node(labels, scene, segments=wanted, name="MedDL scratch")
        try:
            if replace:
                ids = [i for s in segments for i in mrml.copy_segments(scratch, destination, [s.name],
                                                                        replace_id=s.segment_id)]
            else:
                ids = mrml.copy_segments(scratch, destination, [w.name for w in wanted])
        finally:
            mrml.remove_node(scene, scratch)
        return SegmentationResult(segmentation=destination, segment_ids=ids, process=process)
