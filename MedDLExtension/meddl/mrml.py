"""The MRML adapter: the only place where :class:`~meddl.volume.Volume` meets Slicer nodes.

Uses MRML and VTK classes only (no Qt, no ``slicer.app``, no ``slicer.util``), so the same code
runs inside the 3D Slicer application and with the PyPI ``slicer-core`` wheel.

Conventions:

* A volume node's image data is stored in KJI order (VTK: x fastest), a Volume is ``(C, I, J, K)``;
  the node's IJKToRAS matrix is the Volume's affine (oblique directions, anisotropic spacing and
  origin kept exactly). A 2D Volume becomes a one-slice node, tagged with the node attribute
  ``MedDL.NDim = 2`` so it comes back 2D.
* A displacement field becomes a grid transform node whose **from parent** transform is the
  field: the resampling convention, the same as ITK's fixed-to-moving transform.
* Segment label values live in the segment tag ``MedDL.Label``.
"""

from __future__ import annotations

import colorsys
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputError, MedDLError
from .volume import Kind, Volume

__all__ = [
    "SegmentInfo",
    "volume_to_node",
    "node_to_volume",
    "labels_to_segmentation_node",
    "segmentation_node_to_labels",
    "displacement_to_transform_node",
    "transform_node_to_displacement",
    "volumes_to_sequence_node",
    "sequence_node_to_volumes",
    "browse_sequence",
    "save_scene",
    "load_scene",
    "LABEL_TAG",
    "NDIM_ATTRIBUTE",
]

#: Segment tag holding the label value of a segment.
LABEL_TAG = "MedDL.Label"
#: Node attribute that marks a one-slice node holding a 2D image.
NDIM_ATTRIBUTE = "MedDL.NDim"

_GREY_COLOR_IDS = ("vtkMRMLColorTableNodeGrey",)
_LABEL_COLOR_IDS = ("vtkMRMLColorTableNodeFileGenericAnatomyColors.txt", "vtkMRMLColorTableNodeLabels")


@dataclass(frozen=True)
class SegmentInfo:
    """One segment: its label value in a label map, display name and RGB colour (0..1)."""

    label: int
    name: str
    color: tuple[float, float, float]
    segment_id: str = ""


# -- small helpers ------------------------------------------------------------------------------


def _vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _numpy_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _require_scene(scene) -> None:
    if scene is None or not hasattr(scene, "AddNode") or not scene.IsA("vtkMRMLScene"):
        raise InputError(f"scene: expected a vtkMRMLScene, got {type(scene).__name__}")


def _require_node(node, class_name: str, what: str) -> None:
    if node is None or not hasattr(node, "IsA") or not node.IsA(class_name):
        got = node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__
        raise InputError(f"{what}: expected a {class_name}, got {got}")


def _unique_name(scene, base: str) -> str:
    return scene.GenerateUniqueName(base) if scene is not None else base


def _vtk_ready(data: np.ndarray) -> np.ndarray:
    """VTK has no bool or float16 arrays."""
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype == np.float16:
        return data.astype(np.float32)
    return data


def _image_data_from_kji(arr: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData (origin 0, spacing 1) from an array ``(K, J, I, C)``."""
    k, j, i, c = arr.shape
    flat = np.ascontiguousarray(arr).reshape(-1, c) if c > 1 else np.ascontiguousarray(arr).reshape(-1)
    array = numpy_support.numpy_to_vtk(flat, deep=True, array_type=numpy_support.get_vtk_array_type(flat.dtype))
    array.SetName("ImageScalars")
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(array)
    return image


def _volume_to_kji(volume: Volume) -> np.ndarray:
    """``(C, I, J[, K])`` -> ``(K, J, I, C)`` (a 2D volume gets K = 1)."""
    data = _vtk_ready(np.asarray(volume.numpy()))
    if volume.ndim == 2:
        data = data[..., None]
    return np.transpose(data, (3, 2, 1, 0))


def _image_data_to_array(image: vtk.vtkImageData, what: str) -> np.ndarray:
    """Point scalars of an image as ``(C, I, J, K)`` (a copy, owned by numpy)."""
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise InputError(f"{what}: expected image data with voxel scalars, got none (empty or tensor volume)")
    dims = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(scalars).copy()
    ncomp = scalars.GetNumberOfComponents()
    arr = arr.reshape(dims[2], dims[1], dims[0], ncomp)
    return np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)))


def _maybe_2d(node, data: np.ndarray, affine: np.ndarray, ndim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Drop the singleton K axis when the node is tagged 2D (or ``ndim=2`` is asked)."""
    if ndim is None:
        ndim = 2 if node.GetAttribute(NDIM_ATTRIBUTE) == "2" else 3
    if ndim == 2:
        if data.shape[3] != 1:
            raise InputError(f"node '{node.GetName()}': expected one slice for a 2D image, got {data.shape[3]}")
        data = data[..., 0]
    elif ndim != 3:
        raise InputError(f"ndim: expected 2 or 3, got {ndim}")
    return data, affine


def _ensure_segmentation_converters() -> None:
    """Register the segmentation representation converters when nothing has.

    The Slicer application registers them when its Segmentations module starts; a bare
    ``slicer-core`` process has none, and then even an empty binary-labelmap segment cannot be
    created. Registering the same four rules as the application keeps both environments alike.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (
        "vtkBinaryLabelmapToClosedSurfaceConversionRule",
        "vtkClosedSurfaceToBinaryLabelmapConversionRule",
        "vtkClosedSurfaceToFractionalLabelmapConversionRule",
        "vtkFractionalLabelmapToClosedSurfaceConversionRule",
    ):
        if hasattr(slicer, rule):
            factory.RegisterConverterRule(getattr(slicer, rule)())


def _default_color(label: int) -> tuple[float, float, float]:
    """A well-spread, deterministic colour per label (golden-ratio hues)."""
    hue = (label * 0.618033988749895) % 1.0
    return tuple(float(c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.95))


# -- volumes ------------------------------------------------------------------------------------


def _volume_node_class(volume: Volume) -> str:
    if volume.kind is Kind.COMPLEX or volume.is_complex:
        raise InputError(
            "volume: expected real voxels for a Slicer volume node, got complex data; "
            "convert to magnitude or phase first (e.g. volume.with_data(np.abs(data), kind='intensity'))"
        )
    if volume.kind is Kind.DISPLACEMENT:
        raise InputError(
            "volume: expected an intensity or label volume, got a displacement field; "
            "use displacement_to_transform_node"
        )
    if volume.kind is Kind.LABEL:
        if volume.channels != 1:
            raise InputError(f"label volume: expected 1 channel, got {volume.channels}")
        return "vtkMRMLLabelMapVolumeNode"
    if volume.channels == 1:
        return "vtkMRMLScalarVolumeNode"
    if volume.channels in (3, 4):
        return "vtkMRMLVectorVolumeNode"
    raise InputError(
        f"volume: expected 1 (scalar) or 3/4 (RGB/RGBA) channels for a volume node, got {volume.channels}; "
        "put one channel per item in a sequence (volumes_to_sequence_node)"
    )


def _fill_volume_node(node, volume: Volume) -> None:
    """Image data, geometry and the 2D tag of a volume node (no scene needed)."""
    node.SetAndObserveImageData(_image_data_from_kji(_volume_to_kji(volume)))
    node.SetIJKToRASMatrix(_vtk_matrix(volume.affine))
    node.SetAttribute(NDIM_ATTRIBUTE, str(volume.ndim))


def _ensure_volume_display(node, scene, class_name: str) -> None:
    if node.GetDisplayNode() is not None:
        return
    display_class = {
        "vtkMRMLLabelMapVolumeNode": "vtkMRMLLabelMapVolumeDisplayNode",
        "vtkMRMLScalarVolumeNode": "vtkMRMLScalarVolumeDisplayNode",
        "vtkMRMLVectorVolumeNode": "vtkMRMLVectorVolumeDisplayNode",
    }[class_name]
    display = scene.CreateNodeByClass(display_class)
    display.UnRegister(None)  # CreateNodeByClass hands over a reference: the Python object owns it now
    candidates = {"vtkMRMLLabelMapVolumeNode": _LABEL_COLOR_IDS, "vtkMRMLScalarVolumeNode": _GREY_COLOR_IDS}
    for color_id in candidates.get(class_name, ()):
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    scene.AddNode(display)
    node.SetAndObserveDisplayNodeID(display.GetID())


def node_fits(volume: Volume, node) -> bool:
    """Whether ``node`` is the kind of volume node ``volume`` goes into (:func:`volume_to_node`)."""
    class_name = _volume_node_class(volume)
    ok = hasattr(node, "IsA") and bool(node.IsA(class_name))
    if class_name == "vtkMRMLScalarVolumeNode":  # a labelmap or vector node is a scalar node subclass
        ok = ok and not node.IsA("vtkMRMLLabelMapVolumeNode") and not node.IsA("vtkMRMLTensorVolumeNode")
    return ok


def volume_to_node(volume: Volume, scene, name: str = "", node=None):
    """Put a Volume into the scene as a volume node.

    Args:
        volume: ``(C, I, J[, K])``. Kind label -> labelmap node; 3 or 4 channels (RGB/RGBA) ->
            vector volume node; 1 channel -> scalar volume node; 2D -> a one-slice node.
            Complex and displacement volumes are refused (choose magnitude/phase, or use
            :func:`displacement_to_transform_node`).
        scene: the ``vtkMRMLScene``.
        name: node name (default: ``volume.meta['name']`` or "Volume"), made unique.
        node: update this node in place instead (keeps its name and ID); must be of the
            right class for the volume.

    Returns:
        The ``vtkMRMLScalarVolumeNode`` / ``vtkMRMLLabelMapVolumeNode`` / ``vtkMRMLVectorVolumeNode``,
        with a display node (grey or label colour table when the scene has one).
    """
    _require_scene(scene)
    if not isinstance(volume, Volume):
        raise InputError(f"volume: expected a meddl Volume, got {type(volume).__name__}")
    class_name = _volume_node_class(volume)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, _unique_name(scene, name or volume.meta.get("name") or "Volume"))
    else:
        if not node_fits(volume, node):
            exact = node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__
            raise InputError(f"node: expected a {class_name} for this {volume.kind.value} volume, got {exact}")
        if node.GetScene() is None:
            scene.AddNode(node)
    was_modifying = node.StartModify()
    try:
        _fill_volume_node(node, volume)
        _ensure_volume_display(node, scene, class_name)
    finally:
        node.EndModify(was_modifying)
    return node


def node_to_volume(node, kind: Kind | str | None = None, ndim: int | None = None) -> Volume:
    """Read a scalar, labelmap or vector volume node as a Volume.

    Args:
        node: ``vtkMRMLScalarVolumeNode`` (labelmap included) or ``vtkMRMLVectorVolumeNode``.
        kind: force the kind; by default label for labelmap nodes, intensity otherwise.
        ndim: 2 to get ``(C, I, J)`` from a one-slice node; by default 2 only for nodes that
            :func:`volume_to_node` tagged as 2D.

    Returns:
        Volume ``(C, I, J, K)`` (or ``(C, I, J)``), dtype as stored, affine = IJKToRAS. A parent
        transform is *not* applied (the node's own geometry is returned); its ID is recorded in
        ``meta['parent_transform']``.
    """
    _require_node(node, "vtkMRMLVolumeNode", "volume node")
    image = node.GetImageData()
    name = node.GetName() or ""
    data = _image_data_to_array(image, f"volume node '{name}'")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    affine = _numpy_matrix(m)
    extent = image.GetExtent()
    start = np.array([extent[0], extent[2], extent[4]], dtype=np.float64)
    if np.any(start):  # IJK indices count from the extent start
        affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ start
    data, affine = _maybe_2d(node, data, affine, ndim)
    if kind is None:
        kind = Kind.LABEL if node.IsA("vtkMRMLLabelMapVolumeNode") else Kind.INTENSITY
    meta = {"name": name, "node_id": node.GetID() or ""}
    parent = node.GetParentTransformNode()
    if parent is not None:
        meta["parent_transform"] = parent.GetID()
    return Volume(data, affine, Kind(kind), meta)


# -- segmentations ------------------------------------------------------------------------------


def _label_array(labels: Volume) -> np.ndarray:
    if not isinstance(labels, Volume):
        raise InputError(f"labels: expected a meddl Volume, got {type(labels).__name__}")
    if labels.channels != 1:
        raise InputError(f"labels: expected 1 channel, got {labels.channels}")
    data = np.asarray(labels.numpy())
    if labels.kind is not Kind.LABEL and not np.issubdtype(data.dtype, np.integer):
        raise InputError(f"labels: expected a label volume (integer values), got kind '{labels.kind.value}'")
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise InputError("labels: expected integer label values, got non-integer values")
    data = data.astype(np.int64)
    if data.size and data.min() < 0:
        raise InputError(f"labels: expected label values >= 0, got {int(data.min())}")
    if data.size and data.max() > np.iinfo(np.int32).max:
        raise InputError(f"labels: expected label values below 2**31, got {int(data.max())}")
    return data.astype(np.int32)


def _segment_label(segment) -> int | None:
    if not segment.HasTag(LABEL_TAG):
        return None
    value = vtk.reference("")
    segment.GetTag(LABEL_TAG, value)
    try:
        return int(str(value))
    except ValueError:
        return None


def labels_to_segmentation_node(
    labels: Volume,
    scene,
    segments: list[SegmentInfo] | None = None,
    name: str = "",
    node=None,
):
    """Import a label map into a segmentation node, one segment per label value.

    Uses ``vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode`` through a
    temporary labelmap node and colour table (removed afterwards). The segmentation's reference
    geometry is the label map's grid.

    Args:
        labels: label volume ``(1, I, J[, K])``, integer values >= 0 (0 = background).
        scene: the ``vtkMRMLScene``.
        segments: names and colours per label value. Labels present in the data but not listed
            get "Segment_<label>" and a default colour; listed labels with no voxels become
            empty segments (so a model's class list is always complete).
        name: node name (default "Segmentation"), made unique.
        node: update this segmentation node in place (its segments are replaced).

    Returns:
        The ``vtkMRMLSegmentationNode``; every segment carries its label value in the
        ``MedDL.Label`` tag.
    """
    _require_scene(scene)
    _ensure_segmentation_converters()
    data = _label_array(labels)
    info = {}
    for s in segments or []:
        if not isinstance(s, SegmentInfo):
            raise InputError(f"segments: expected SegmentInfo items, got {type(s).__name__}")
        if int(s.label) <= 0:
            raise InputError(f"segments: expected label values > 0 (0 is background), got {s.label} for '{s.name}'")
        info[int(s.label)] = s
    present = [int(v) for v in np.unique(data) if v != 0]
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _unique_name(scene, name or "Segmentation"))
    else:
        _require_node(node, "vtkMRMLSegmentationNode", "segmentation node")
        if node.GetScene() is None:
            scene.AddNode(node)
    all_labels = sorted(set(present) | set(info))
    names = {v: (info[v].name if v in info else f"Segment_{v}") for v in all_labels}
    colors = {v: (tuple(float(c) for c in info[v].color) if v in info else _default_color(v)) for v in all_labels}

    label_volume = Volume(data, labels.affine, Kind.LABEL)
    temp_nodes = []
    try:
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", _unique_name(scene, "MedDLTempLabels"))
        temp_nodes.append(labelmap)
        labelmap.HideFromEditorsOn()
        _fill_volume_node(labelmap, label_volume)
        color_table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", _unique_name(scene, "MedDLTempColors"))
        temp_nodes.append(color_table)
        color_table.SetTypeToUser()
        color_table.SetNumberOfColors((max(all_labels) if all_labels else 0) + 1)
        color_table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for v in all_labels:  # unique names here (the import names segments by them), the given ones after
            color_table.SetColor(v, _import_name(v), *colors[v], 1.0)
        display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        temp_nodes.append(display)
        display.SetAndObserveColorNodeID(color_table.GetID())
        labelmap.SetAndObserveDisplayNodeID(display.GetID())

        was_modifying = node.StartModify()
        try:
            segmentation = node.GetSegmentation()
            segmentation.RemoveAllSegments()
            node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            messages = slicer.vtkMRMLMessageCollection()
            try:
                ok = logic.ImportLabelmapToSegmentationNode(labelmap, node, "", messages)
            except TypeError:  # a Slicer older than the messages argument
                messages = None
                ok = logic.ImportLabelmapToSegmentationNode(labelmap, node, "")
            if not ok:
                raise MedDLError(f"segmentation import failed: {_error_text(messages)}")
            imported = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
            by_name = {}
            for segment_id in imported:
                segment = segmentation.GetSegment(segment_id)
                by_name[segment.GetName()] = (segment_id, segment)
            for v in all_labels:
                if _import_name(v) in by_name:
                    segment_id, segment = by_name.pop(_import_name(v))
                else:  # no voxels carry this label: keep the class as an empty segment
                    segment_id = segmentation.AddEmptySegment("", names[v], list(colors[v]))
                    segment = segmentation.GetSegment(segment_id)
                segment.SetName(names[v])
                segment.SetColor(*colors[v])
                segment.SetTag(LABEL_TAG, str(v))
            node.SetAttribute(NDIM_ATTRIBUTE, str(labels.ndim))
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
        finally:
            node.EndModify(was_modifying)
    finally:
        for temp in reversed(temp_nodes):
            scene.RemoveNode(temp)
    return node


def _import_name(value: int) -> str:
    return f"__meddl_label_{value}__"


def _reference_node(reference, scene):
    """A volume node giving the export grid, plus whether it is a temporary one."""
    if isinstance(reference, Volume):
        grid = Volume(np.zeros((1, *reference.spatial_shape), np.uint8), reference.affine)
        temp = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", _unique_name(scene, "MedDLTempReference"))
        temp.HideFromEditorsOn()
        _fill_volume_node(temp, grid)
        return temp, True
    _require_node(reference, "vtkMRMLVolumeNode", "reference")
    return reference, False


def _node_ids(scene, class_name: str) -> set[str]:
    nodes = scene.GetNodesByClass(class_name)
    return {nodes.GetItemAsObject(n).GetID() for n in range(nodes.GetNumberOfItems())}


def _export_segments(
    node, scene, ids: list[str], labels_of: dict[str, int], reference_node, mode, temp_nodes
) -> Volume:
    """One ``ExportSegmentsToLabelmapNode`` pass; ``ids`` have distinct names."""
    segmentation = node.GetSegmentation()
    color_table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", _unique_name(scene, "MedDLTempExportColors"))
    temp_nodes.append(color_table)
    color_table.HideFromEditorsOn()
    color_table.SetTypeToUser()
    # the export writes codes 1..n (Slicer keeps label values below 32768 only) mapped to the values after
    values = [labels_of[s] for s in ids]
    color_table.SetNumberOfColors(len(ids) + 1)
    color_table.SetColor(0, "__meddl_unused_0__", 0.0, 0.0, 0.0, 0.0)
    for code, s in enumerate(ids, start=1):
        color_table.SetColor(code, segmentation.GetSegment(s).GetName(), 0.5, 0.5, 0.5, 1.0)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", _unique_name(scene, "MedDLTempExport"))
    temp_nodes.append(labelmap)
    labelmap.HideFromEditorsOn()
    # Given a display node, the logic does not look for a default label colour table
    # (which a bare scene lacks, and warns about).
    display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
    temp_nodes.append(display)
    labelmap.SetAndObserveDisplayNodeID(display.GetID())
    before = _node_ids(scene, "vtkMRMLColorNode")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        node, ids, labelmap, reference_node, mode, color_table
    )
    # Some Slicer versions also make a "<name>_ColorTable" for the exported labelmap: ours to remove.
    for node_id in _node_ids(scene, "vtkMRMLColorNode") - before:
        temp_nodes.append(scene.GetNodeByID(node_id))
    image = labelmap.GetImageData()
    if not ok or image is None or image.GetPointData().GetScalars() is None:
        raise MedDLError(f"segmentation '{node.GetName()}': export to a label map failed")
    exported = node_to_volume(labelmap, kind=Kind.LABEL, ndim=3)
    codes = exported.numpy()
    found = set(np.unique(codes).tolist()) - {0}
    if not found <= set(range(1, len(ids) + 1)):
        raise MedDLError(
            f"segmentation '{node.GetName()}': export gave label codes {sorted(found)}, expected some of 1..{len(ids)}"
        )
    lut = np.array([0, *values], dtype=np.int64)
    return exported.with_data(lut[codes.astype(np.int64)])


def segmentation_node_to_labels(
    node, reference=None, segment_ids: list[str] | None = None
) -> tuple[Volume, list[SegmentInfo]]:
    """Export segments to one label map (``ExportSegmentsToLabelmapNode``).

    Args:
        node: the ``vtkMRMLSegmentationNode`` (must be in a scene).
        reference: the output grid, a volume node or a Volume; by default the segmentation's
            own reference geometry (or the union of the segments' extents when it has none).
        segment_ids: which segments, in paint order (later ones win where they overlap);
            default all, in segment order.

    Returns:
        ``(labels, segments)``: label volume ``(1, I, J, K)`` (uint8, uint16 or int32 by the
        largest label) and one :class:`SegmentInfo` per exported segment. Label values come from
        the ``MedDL.Label`` tag (any value; a tag an earlier segment already has counts as none);
        untagged segments take the smallest free values from 1.
    """
    _require_node(node, "vtkMRMLSegmentationNode", "segmentation node")
    _ensure_segmentation_converters()
    scene = node.GetScene()
    if scene is None:
        raise InputError("segmentation node: expected a node in a scene, got a node outside any scene")
    segmentation = node.GetSegmentation()
    all_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    ids = list(all_ids) if segment_ids is None else [str(s) for s in segment_ids]
    missing = [s for s in ids if s not in all_ids]
    if missing:
        raise InputError(f"segment_ids: {', '.join(missing)} not in '{node.GetName()}'; it has {', '.join(all_ids)}")
    if not ids:
        raise InputError(f"segmentation '{node.GetName()}': expected at least one segment to export, got none")

    tagged = {s: _segment_label(segmentation.GetSegment(s)) for s in ids}
    first_with: dict[int, str] = {}
    for s in ids:  # a tag already taken by an earlier segment (copied from another node): a new value
        v = tagged[s]
        if v is not None and first_with.setdefault(v, s) != s:
            tagged[s] = None
    used = {v for v in tagged.values() if v is not None}
    labels_of: dict[str, int] = {}
    next_free = 1
    for s in ids:
        if tagged[s] is not None:
            labels_of[s] = tagged[s]
            continue
        while next_free in used:
            next_free += 1
        labels_of[s] = next_free
        used.add(next_free)

    # Segments are painted in `ids` order (later ones win). The logic takes each segment's value
    # from an export colour table by segment *name*, so segments that share a name are exported
    # in separate passes and merged in the same order.
    groups: list[list[str]] = []
    names_in_group: set[str] = set()
    for s in ids:
        segment_name = segmentation.GetSegment(s).GetName()
        if not groups or segment_name in names_in_group:
            groups.append([])
            names_in_group = set()
        groups[-1].append(s)
        names_in_group.add(segment_name)

    top = max(labels_of.values())
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
    temp_nodes = []
    try:
        reference_node = None
        if reference is not None:
            reference_node, is_temp = _reference_node(reference, scene)
            if is_temp:
                temp_nodes.append(reference_node)
        has_geometry = bool(node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())) or bool(
            segmentation.GetConversionParameter("Reference image geometry")
        )
        if reference_node is None and not has_geometry and len(groups) > 1:
            raise InputError(
                f"segmentation '{node.GetName()}': segments share names and it has no reference geometry; "
                "pass reference=<volume node or Volume> to choose the output grid"
            )
        mode = (
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
            if reference_node is not None or has_geometry
            else slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS
        )
        data = None
        exported = None
        for group in groups:
            exported = _export_segments(node, scene, group, labels_of, reference_node, mode, temp_nodes)
            raw = exported.numpy()
            if data is None:
                data = raw.astype(dtype)
            else:
                data = np.where(raw != 0, raw.astype(dtype), data)
    finally:
        for temp in reversed(temp_nodes):
            if temp.GetScene() is not None:
                scene.RemoveNode(temp)

    ndim = 2 if node.GetAttribute(NDIM_ATTRIBUTE) == "2" and data.shape[3] == 1 and reference is None else None
    if isinstance(reference, Volume):
        ndim = reference.ndim
    affine = exported.affine
    if ndim == 2:
        data = data[..., 0]
    if isinstance(reference, Volume):
        affine = reference.affine  # exactly the caller's grid (export rounds the matrix through VTK)
    infos = []
    for s in ids:
        segment = segmentation.GetSegment(s)
        color = tuple(float(c) for c in segment.GetColor())
        infos.append(SegmentInfo(labels_of[s], segment.GetName(), color, s))
    meta = {"name": node.GetName(), "node_id": node.GetID() or "", "segments": [i.name for i in infos]}
    return Volume(np.ascontiguousarray(data), affine, Kind.LABEL, meta), infos


# -- transforms ---------------------------------------------------------------------------------


def displacement_to_transform_node(field: Volume, scene, name: str = "", node=None):
    """A displacement field as a grid transform node (``vtkOrientedGridTransform``).

    Args:
        field: displacement volume ``(3, I, J, K)`` (or ``(2, I, J)``: a one-slice grid with zero
            out-of-plane displacement), RAS mm, resampling convention.
        scene: the ``vtkMRMLScene``.
        name: node name (default "Displacement"), made unique.
        node: update this ``vtkMRMLGridTransformNode`` in place.

    Returns:
        The ``vtkMRMLGridTransformNode``; the field is its *transform from parent* (so
        ``GetTransformFromParent().TransformPoint(p) == p + u(p)``), with the grid's direction
        matrix set (oblique grids are exact) and linear interpolation (as ITK).
    """
    _require_scene(scene)
    if not isinstance(field, Volume) or field.kind is not Kind.DISPLACEMENT:
        got = field.kind.value if isinstance(field, Volume) else type(field).__name__
        raise InputError(f"displacement field: expected a volume of kind 'displacement', got {got}")
    if field.channels != field.ndim:
        raise InputError(f"displacement field: expected {field.ndim} channels, got {field.channels}")
    u = np.asarray(field.numpy(), dtype=np.float64)
    if field.ndim == 2:
        u = np.concatenate([u, np.zeros_like(u[:1])], axis=0)[..., None]
    spacing = np.linalg.norm(field.affine[:3, :3], axis=0)
    direction = field.affine[:3, :3] / spacing[None, :]
    image = _image_data_from_kji(np.transpose(u, (3, 2, 1, 0)))
    image.SetSpacing(*spacing)
    image.SetOrigin(*field.affine[:3, 3])
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(image)
    direction4 = np.eye(4)
    direction4[:3, :3] = direction
    grid.SetGridDirectionMatrix(_vtk_matrix(direction4))
    grid.SetInterpolationModeToLinear()
    grid.SetDisplacementScale(1.0)
    grid.SetDisplacementShift(0.0)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", _unique_name(scene, name or "Displacement"))
    else:
        _require_node(node, "vtkMRMLGridTransformNode", "transform node")
        if node.GetScene() is None:
            scene.AddNode(node)
    node.SetAndObserveTransformFromParent(grid)
    node.SetAttribute(NDIM_ATTRIBUTE, str(field.ndim))
    return node


def _grid_geometry(grid) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine (index -> RAS) and dims of a vtkOrientedGridTransform's grid."""
    image = grid.GetDisplacementGrid()
    direction = np.eye(4)
    matrix = grid.GetGridDirectionMatrix()
    if matrix is not None:
        direction = _numpy_matrix(matrix)
    extent = image.GetExtent()
    affine = np.eye(4)
    affine[:3, :3] = direction[:3, :3] * np.asarray(image.GetSpacing())[None, :]
    start = np.array([extent[0], extent[2], extent[4]], dtype=np.float64)
    affine[:3, 3] = np.asarray(image.GetOrigin()) + affine[:3, :3] @ start
    return affine, image.GetDimensions()


def _sample(transform, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``T(p) - p`` on a grid, ``(3, *shape)``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, len(shape))
    pad = np.zeros((idx.shape[0], 3))
    pad[:, : len(shape)] = idx
    points = pad @ affine[:3, :3].T + affine[:3, 3]
    source = vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points), deep=True))
    target = vtk.vtkPoints()
    target.SetDataTypeToDouble()
    transform.TransformPoints(source, target)
    moved = numpy_support.vtk_to_numpy(target.GetData()).astype(np.float64)
    return np.moveaxis((moved - points).reshape(*shape, 3), -1, 0)


def transform_node_to_displacement(node, reference: Volume | None = None) -> Volume:
    """A transform node's *from parent* transform as a displacement field (RAS mm).

    Args:
        node: any ``vtkMRMLTransformNode``.
        reference: grid to sample on (``GetTransformFromParent()`` at every voxel centre);
            works for linear, B-spline, grid and composite transforms. Without it the node must
            hold a grid: its stored from-parent grid is returned as is, and a grid stored only
            as "to parent" is inverted numerically on its own grid.

    Returns:
        Displacement volume ``(3, I, J, K)`` (``(2, I, J)`` for a 2D reference or a node
        made from a 2D field). The node's own parent transforms are not included.
    """
    _require_node(node, "vtkMRMLTransformNode", "transform node")
    from_parent = node.GetTransformFromParent()
    if from_parent is None:
        raise InputError(f"transform node '{node.GetName()}': expected a transform, got an empty node")
    meta = {"name": node.GetName(), "node_id": node.GetID() or ""}
    if reference is not None:
        if not isinstance(reference, Volume):
            raise InputError(f"reference: expected a meddl Volume, got {type(reference).__name__}")
        u = _sample(from_parent, reference.affine, reference.spatial_shape)
        return Volume(u[: reference.ndim], reference.affine, Kind.DISPLACEMENT, meta)

    grid = node.GetTransformFromParentAs("vtkOrientedGridTransform", False, True)
    if grid is not None and grid.GetDisplacementGrid() is not None:
        image = grid.GetDisplacementGrid()
        u = _image_data_to_array(image, f"grid transform '{node.GetName()}'").astype(np.float64)
        u = u * grid.GetDisplacementScale() + grid.GetDisplacementShift()
        affine, _ = _grid_geometry(grid)
    else:
        inverse = node.GetTransformToParentAs("vtkOrientedGridTransform", False, True)
        if inverse is None or inverse.GetDisplacementGrid() is None:
            raise InputError(
                f"transform node '{node.GetName()}': expected a grid transform, got "
                f"{from_parent.GetClassName()}; pass reference=<Volume> to sample it on a grid"
            )
        affine, dims = _grid_geometry(inverse)
        # A private inverted copy with a tight tolerance: VTK's default (1e-3 mm, checked on
        # the residual) leaves errors of several micrometres, and the node stays untouched.
        inverted = slicer.vtkOrientedGridTransform()
        inverted.DeepCopy(inverse)
        inverted.Inverse()
        inverted.SetInverseTolerance(1e-7)
        inverted.SetInverseIterations(1000)
        u = _sample(inverted, affine, tuple(dims))
        meta["inverted"] = True
    if node.GetAttribute(NDIM_ATTRIBUTE) == "2" and u.shape[3] == 1:
        u = u[:2, ..., 0]
    return Volume(np.ascontiguousarray(u), affine, Kind.DISPLACEMENT, meta)


# -- sequences ----------------------------------------------------------------------------------


def volumes_to_sequence_node(
    volumes: list[Volume],
    scene,
    name: str = "",
    index_name: str = "coil",
    index_unit: str = "",
):
    """A sequence node with one volume node per item, index values "0", "1", ...

    Args:
        volumes: scalar, label or RGB volumes (as for :func:`volume_to_node`), e.g. one per coil.
        scene: the ``vtkMRMLScene``.
        name: node name (default "Sequence"), made unique.
        index_name: what the index counts ("coil", "time", "echo").
        index_unit: its unit ("" for a count, "s", "ms").

    Returns:
        The ``vtkMRMLSequenceNode`` (numeric index).
    """
    _require_scene(scene)
    volumes = list(volumes)
    if not volumes:
        raise InputError("volumes: expected at least one volume for a sequence, got none")
    classes = {_volume_node_class(v) for v in volumes if isinstance(v, Volume)}
    if len(classes) != 1 or not all(isinstance(v, Volume) for v in volumes):
        raise InputError(f"volumes: expected volumes of one node type, got {sorted(classes) or 'non-volumes'}")
    class_name = classes.pop()
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", _unique_name(scene, name or "Sequence"))
    sequence.SetIndexName(index_name)
    sequence.SetIndexUnit(index_unit)
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    base = sequence.GetName()
    for n, volume in enumerate(volumes):
        item = scene.CreateNodeByClass(class_name)
        item.UnRegister(None)  # owned by the Python object (the sequence keeps its own copy)
        item.SetName(f"{base} [{index_name} {n}]")
        _fill_volume_node(item, volume)
        sequence.SetDataNodeAtValue(item, str(n))
    return sequence


def browse_sequence(sequence, scene):
    """A sequence browser for ``sequence`` (Slicer shows a sequence only through a browser's proxy node).

    Returns the ``vtkMRMLSequenceBrowserNode``, or None where the Sequences module is not part of
    the scene's node classes (Slicer's core libraries without the application). In the application
    the proxy node is created at once, so the first item appears in the node selectors.
    """
    _require_scene(scene)
    _require_node(sequence, "vtkMRMLSequenceNode", "sequence")
    if not scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
        return None
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", _unique_name(scene, f"{sequence.GetName()} browser"))
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    modules = getattr(slicer, "modules", None)
    sequences = getattr(modules, "sequences", None)
    if sequences is not None:
        sequences.logic().UpdateProxyNodesFromSequences(browser)
    return browser


def sequence_node_to_volumes(node) -> list[Volume]:
    """The volumes of a sequence node, in index order; ``meta['index']`` holds each index value."""
    _require_node(node, "vtkMRMLSequenceNode", "sequence node")
    out = []
    for n in range(node.GetNumberOfDataNodes()):
        item = node.GetNthDataNode(n)
        if item is None or not item.IsA("vtkMRMLVolumeNode"):
            got = item.GetClassName() if item is not None else "nothing"
            raise InputError(f"sequence '{node.GetName()}' item {n}: expected a volume node, got {got}")
        volume = node_to_volume(item)
        out.append(Volume(volume.data, volume.affine, volume.kind, {**volume.meta, "index": node.GetNthIndexValue(n)}))
    return out


# -- scenes -------------------------------------------------------------------------------------


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "node"
    return stem[:100]


def _error_text(messages) -> str:
    text = messages.GetAllMessagesAsString().strip() if messages is not None else ""
    return " ".join(text.split())[:400]


def _storable_nodes(scene) -> list:
    nodes = []
    collection = scene.GetNodesByClass("vtkMRMLStorableNode")
    for n in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(n)
        if not node.GetSaveWithScene():
            continue
        if node.GetSingletonTag():  # built-in colour tables and other application singletons
            continue
        if node.GetHideFromEditors():  # private nodes: Commit() saves them into a _Private folder
            continue
        if node.IsA("vtkMRMLColorTableNode") and node.GetType() != slicer.vtkMRMLColorTableNode.User:
            continue  # procedural colour tables are rebuilt by the application, not stored
        if node.IsA("vtkMRMLSequenceNode") and node.GetNumberOfDataNodes() == 0:
            continue
        nodes.append(node)
    return nodes


def _write_node_data(node, scene, folder: Path, used: set[str]) -> Path:
    storage = node.GetStorageNode()
    if storage is None:
        storage = node.CreateDefaultStorageNode()
        if storage is None:
            raise InputError(f"node '{node.GetName()}' ({node.GetClassName()}): no storage node class can save it")
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    extension = storage.GetDefaultWriteFileExtension() or "nrrd"
    stem = _file_stem(node.GetName() or node.GetID())
    filename = f"{stem}.{extension}"
    counter = 1
    while filename.lower() in used:
        filename = f"{stem}_{counter}.{extension}"
        counter += 1
    used.add(filename.lower())
    path = folder / filename
    storage.SetFileName(str(path))
    if hasattr(storage, "ResetFileNameList"):
        storage.ResetFileNameList()
    if not storage.WriteData(node):
        raise InputError(f"cannot write '{path}' for node '{node.GetName()}': {_error_text(storage.GetUserMessages())}")
    return path


def save_scene(scene, path: str | os.PathLike) -> Path:
    """Save a scene with all its data.

    Args:
        scene: the ``vtkMRMLScene``.
        path: ``*.mrml``: every storable node's data is written next to it (volumes ``.nrrd``,
            segmentations ``.seg.nrrd``, transforms ``.h5``, sequences ``.seq.nrrd``/``.seq.mrb``),
            with storage nodes pointing at those files, then the scene file (atomically).
            ``*.mrb``: a Slicer data bundle (zip of ``<name>/<name>.mrml`` and ``<name>/Data/``).

    Returns:
        ``path``. As with Slicer's own "Save", a ``.mrml`` save re-points the nodes' storage
        nodes and the scene's URL and root directory to the new location.
    """
    _require_scene(scene)
    path = Path(path).absolute()
    suffix = path.suffix.lower()
    if suffix not in (".mrml", ".mrb"):
        raise InputError(f"scene file '{path}': unknown format '{suffix}'; expected .mrml or .mrb")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mrb":
        return _save_bundle(scene, path)
    used: set[str] = set()
    for node in _storable_nodes(scene):
        _write_node_data(node, scene, path.parent, used)
    scene.SetRootDirectory(str(path.parent))
    messages = slicer.vtkMRMLMessageCollection()
    # Written under a temporary name, then renamed: no half-written scene file. The name must
    # not start with a dot (MRML derives its private-data folder name from it).
    tmp = path.with_name(f"{path.stem}-part{os.getpid()}-{uuid.uuid4().hex[:8]}.mrml")
    try:
        scene.SetURL(str(path))
        if not scene.Commit(str(tmp), messages) or not tmp.is_file():
            raise InputError(f"cannot write scene '{path}': {_error_text(messages)}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _save_bundle(scene, path: Path) -> Path:
    messages = slicer.vtkMRMLMessageCollection()
    # MRML names the bundle's inner folder after the file, so write under the final name in a
    # temporary folder beside it, then move it into place.
    folder = Path(tempfile.mkdtemp(prefix=f"{path.stem}-part", dir=path.parent))
    try:
        tmp = folder / path.name
        if not scene.WriteToMRB(str(tmp), None, messages) or not zipfile.is_zipfile(tmp):
            raise InputError(f"cannot write scene bundle '{path}': {_error_text(messages)}")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def _ensure_cache_directory(scene) -> None:
    """MRML unpacks bundles into the scene's cache folder; the Slicer application sets one up,
    a bare scene has none."""
    io_manager = scene.GetDataIOManager()
    cache = io_manager.GetCacheManager() if io_manager is not None else None
    if cache is not None and cache.GetRemoteCacheDirectory():
        return
    if io_manager is None:
        io_manager = slicer.vtkDataIOManager()
        scene.SetDataIOManager(io_manager)
    if cache is None:
        cache = slicer.vtkCacheManager()
        io_manager.SetCacheManager(cache)
        scene.SetCacheManager(cache)
    folder = Path(tempfile.gettempdir()) / "meddl-mrml-cache"
    folder.mkdir(parents=True, exist_ok=True)
    cache.SetRemoteCacheDirectory(str(folder))


def load_scene(path: str | os.PathLike, scene=None):
    """Load a ``.mrml`` scene (with its data files) or a ``.mrb`` bundle.

    Args:
        path: the scene file.
        scene: add the nodes to this scene; default a new ``vtkMRMLScene``.

    Returns:
        The scene. Raises :class:`InputError` if the scene or any data file fails to load.
    """
    path = Path(path).absolute()
    if not path.is_file():
        raise InputError(f"cannot read scene '{path}': no such file")
    suffix = path.suffix.lower()
    if suffix not in (".mrml", ".mrb"):
        raise InputError(f"scene file '{path}': unknown format '{suffix}'; expected .mrml or .mrb")
    fresh = scene is None
    if fresh:
        scene = slicer.vtkMRMLScene()
    else:
        _require_scene(scene)
    messages = slicer.vtkMRMLMessageCollection()
    if suffix == ".mrb":
        _ensure_cache_directory(scene)
        ok = scene.ReadFromMRB(str(path), fresh, messages)
    else:
        scene.SetURL(str(path))
        scene.SetRootDirectory(str(path.parent))
        ok = scene.Connect(messages) if fresh else scene.Import(messages)
    if not ok or messages.GetNumberOfMessagesOfType(vtk.vtkCommand.ErrorEvent):
        raise InputError(f"cannot read scene '{path}': {_error_text(messages) or 'MRML reported a failure'}")
    return scene


# -- editing segmentations in place ------------------------------------------------------------


def copy_segments(source, destination, names: Sequence[str], replace_id: str | None = None) -> list[str]:
    """Copy the segments called ``names`` from one segmentation node to another.

    With ``replace_id`` the first named segment takes the place, ID, name and colour of that
    segment of the destination (the other segments of the destination are untouched).
    """
    src = source.GetSegmentation()
    dst = destination.GetSegmentation()
    ids = [src.GetSegmentIdBySegmentName(n) for n in names]
    ids = [i for i in ids if i]
    if replace_id is not None:
        old = dst.GetSegment(replace_id)
        if old is None or not ids:
            raise MedDLError(f"segment '{replace_id}': cannot replace it (missing in the result or in the segmentation)")
        index = dst.GetSegmentIndex(replace_id)
        name, color = old.GetName(), old.GetColor()
        # give the new segment the old ID inside the scratch node, so the copy keeps it
        segment = src.GetSegment(ids[0])
        src.RemoveSegment(ids[0])
        src.AddSegment(segment, replace_id)
        dst.RemoveSegment(replace_id)
        if not dst.CopySegmentFromSegmentation(src, replace_id):
            raise MedDLError(f"segment '{name}': copying the result into '{destination.GetName()}' failed")
        dst.SetSegmentIndex(replace_id, index)
        copied = dst.GetSegment(replace_id)
        copied.SetName(name)
        copied.SetColor(*color)
        return [replace_id]
    before = set(segment_ids(destination))
    for segment_id in ids:
        if not dst.CopySegmentFromSegmentation(src, segment_id):
            raise MedDLError(f"segment '{segment_id}': copying the result into '{destination.GetName()}' failed")
    return [i for i in segment_ids(destination) if i not in before]


def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes."""
    for i in reversed(range(node.GetNumberOfDisplayNodes())):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            scene.RemoveNode(display)
    storage = node.GetStorageNode()
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(node)


def segment_ids(node) -> list[str]:
    """The segment IDs of a segmentation node, in order."""
    seg = node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]

