"""The MRML adapter against real MRML classes (the PyPI ``slicer-core`` wheel).

Every geometry check compares positions computed by two independent parties: SimpleITK
(``TransformIndexToPhysicalPoint`` in LPS, flipped here) and MRML (``GetIJKToRASMatrix``,
``GetTransformFromParent``), on oblique, anisotropic grids with non-zero origins.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from helpers_geometry import FLIP, oblique_affine, rotation  # noqa: E402
from meddl import io as mio  # noqa: E402
from meddl import mrml  # noqa: E402
from meddl.errors import InputError  # noqa: E402
from meddl.mrml import SegmentInfo  # noqa: E402
from meddl.transforms import read_transform, write_transform  # noqa: E402
from meddl.volume import Volume, affine_from_geometry  # noqa: E402

# -- helpers ----------------------------------------------------------------------------------


def new_scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # harmless here; slicer.util helpers look for it
    return scene


def sitk_oblique_image(nd: int, pixel: str, seed: int = 0) -> sitk.Image:
    """An LPS SimpleITK image built by hand: oblique, anisotropic, non-zero origin."""
    rng = np.random.default_rng(seed)
    size = (9, 7, 5)[:nd]
    shape_kji = tuple(reversed(size))
    if pixel == "float32":
        arr, vector = rng.standard_normal(shape_kji).astype(np.float32), False
    elif pixel == "int16":
        arr, vector = rng.integers(-1000, 3000, size=shape_kji).astype(np.int16), False
    elif pixel == "label":
        arr, vector = rng.choice(np.array([0, 1, 3, 7], np.uint8), size=shape_kji), False
    elif pixel == "rgb":
        arr, vector = rng.integers(0, 256, size=shape_kji + (3,)).astype(np.uint8), True
    else:
        raise ValueError(pixel)
    image = sitk.GetImageFromArray(arr, isVector=vector)
    if nd == 3:
        direction = FLIP[:, None] * rotation(0.3, -0.2, 0.5)  # LPS direction of an oblique RAS grid
        image.SetSpacing((1.2, 0.8, 1.5))
        image.SetOrigin((20.0, -13.0, 7.5))
    else:
        c, s = np.cos(0.4), np.sin(0.4)
        direction = np.array([[c, -s], [s, c]])
        image.SetSpacing((0.7, 1.3))
        image.SetOrigin((-5.0, 9.0))
    image.SetDirection(direction.ravel().tolist())
    return image


def sitk_ras(image: sitk.Image, idx: tuple[int, ...]) -> np.ndarray:
    p = np.zeros(3)
    p[: image.GetDimension()] = image.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx))
    return FLIP * p


def node_ras(node, idx: tuple[int, ...]) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = list(idx) + [0] * (3 - len(idx)) + [1]
    return np.array(m.MultiplyPoint([float(v) for v in ijk])[:3])


def sitk_array_ijk(image: sitk.Image) -> np.ndarray:
    """SimpleITK voxels as ``(I, J[, K][, C])``."""
    arr = sitk.GetArrayFromImage(image)
    nd = image.GetDimension()
    order = tuple(range(nd - 1, -1, -1)) + ((nd,) if image.GetNumberOfComponentsPerPixel() > 1 else ())
    return arr.transpose(order)


def chosen_indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    last = tuple(n - 1 for n in shape)
    return [tuple(0 for _ in shape), last, tuple(n // 2 for n in shape), (last[0],) + tuple(0 for _ in shape[1:])]


def grid_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    pad = np.zeros(idx.shape[:-1] + (3,))
    pad[..., : len(shape)] = idx
    return pad @ affine[:3, :3].T + affine[:3, 3]


def smooth_field(affine: np.ndarray, shape: tuple[int, ...]) -> Volume:
    """A rotation about the grid centre fading out with distance (smooth, invertible)."""
    nd = len(shape)
    p = grid_points(affine, shape)
    c = p.reshape(-1, 3).mean(axis=0)
    r = rotation(0.0, 0.0, 0.2) if nd == 2 else rotation(0.1, -0.1, 0.2)
    d = p - c
    w = np.exp(-np.sum(d**2, axis=-1) / (2 * 10.0**2))[..., None]
    u = w * (d @ (r - np.eye(3)).T)
    return Volume(np.ascontiguousarray(np.moveaxis(u[..., :nd], -1, 0)), affine, "displacement")


def inside_points(field: Volume, n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = np.array(field.spatial_shape, dtype=float)
    return field.index_to_physical(rng.uniform(0.5, shape - 1.5, size=(n, field.ndim)))


def itk_ras(transform, p: np.ndarray, nd: int = 3) -> np.ndarray:
    q = np.asarray(transform.TransformPoint(tuple(float(v) for v in (FLIP * p)[:nd])))
    out = p.copy()
    out[:nd] = FLIP[:nd] * q
    return out


# -- volumes ----------------------------------------------------------------------------------

VOLUME_CASES = [
    ("float32", 3, "vtkMRMLScalarVolumeNode"),
    ("int16", 3, "vtkMRMLScalarVolumeNode"),
    ("rgb", 3, "vtkMRMLVectorVolumeNode"),
    ("label", 3, "vtkMRMLLabelMapVolumeNode"),
    ("float32", 2, "vtkMRMLScalarVolumeNode"),
    ("rgb", 2, "vtkMRMLVectorVolumeNode"),
    ("label", 2, "vtkMRMLLabelMapVolumeNode"),
]


@pytest.mark.parametrize("pixel, nd, node_class", VOLUME_CASES)
def test_sitk_to_node_to_file_to_sitk(tmp_path, pixel, nd, node_class):
    image = sitk_oblique_image(nd, pixel)
    volume = mio.from_sitk(image, kind="label" if pixel == "label" else None)
    scene = new_scene()
    node = mrml.volume_to_node(volume, scene, "image")
    assert node.GetClassName() == node_class and node.GetName() == "image"
    assert node.GetDisplayNode() is not None
    shape = volume.spatial_shape
    for idx in chosen_indices(shape):
        np.testing.assert_allclose(node_ras(node, idx), sitk_ras(image, idx), atol=1e-9)

    # MRML writes the file through the node's own storage node, SimpleITK reads it.
    mrml.save_scene(scene, tmp_path / "scene.mrml")
    written = sitk.ReadImage(node.GetStorageNode().GetFileName())
    expected = sitk_array_ijk(image)
    got = sitk_array_ijk(written)
    if nd == 2:  # a 2D image is stored as a one-slice volume
        assert written.GetSize()[2] == 1
        got = got[:, :, 0]
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    for idx in chosen_indices(shape):
        np.testing.assert_allclose(sitk_ras(written, idx + (0,) * (3 - nd)), sitk_ras(image, idx), atol=1e-9)

    # The scene reloads into a fresh MRML scene with the same voxels and geometry.
    reloaded = mrml.load_scene(tmp_path / "scene.mrml")
    node2 = reloaded.GetFirstNodeByName("image")
    assert node2.GetClassName() == node_class
    back = mrml.node_to_volume(node2)
    assert back.ndim == nd and back.kind == volume.kind and back.numpy().dtype == volume.numpy().dtype
    np.testing.assert_array_equal(back.numpy(), volume.numpy())
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    for idx in chosen_indices(shape):
        np.testing.assert_allclose(node_ras(node2, idx), sitk_ras(image, idx), atol=1e-9)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize(
    "pixel, node_class",
    [
        ("float32", "vtkMRMLScalarVolumeNode"),
        ("label", "vtkMRMLLabelMapVolumeNode"),
        ("rgb", "vtkMRMLVectorVolumeNode"),
    ],
)
def test_files_written_by_meddl_io_read_by_mrml_storage(tmp_path, suffix, pixel, node_class):
    volume = mio.from_sitk(sitk_oblique_image(3, pixel, seed=4), kind="label" if pixel == "label" else None)
    path = mio.write(volume, tmp_path / f"image{suffix}")
    scene = new_scene()
    node = scene.AddNewNodeByClass(node_class, "read")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node) == 1
    back = mrml.node_to_volume(node)
    np.testing.assert_array_equal(back.numpy(), volume.numpy())
    atol = 1e-5 if suffix == ".nii.gz" else 1e-9  # NIfTI stores the orientation in float32
    np.testing.assert_allclose(back.affine, volume.affine, atol=atol)


def test_volume_node_update_in_place_and_dtypes():
    scene = new_scene()
    first = Volume(np.zeros((1, 4, 5, 6), np.float32), oblique_affine())
    node = mrml.volume_to_node(first, scene, "target")
    node_id = node.GetID()
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.float64):
        data = np.arange(3 * 4 * 5, dtype=dtype).reshape(1, 3, 4, 5)
        other = Volume(data, affine_from_geometry((2.0, 1.0, 0.5), (1.0, 2.0, 3.0)))
        same = mrml.volume_to_node(other, scene, node=node)
        assert same is node and node.GetID() == node_id and node.GetName() == "target"
        back = mrml.node_to_volume(node)
        assert back.numpy().dtype == dtype
        np.testing.assert_array_equal(back.numpy(), data)
        np.testing.assert_allclose(back.affine, other.affine)
    assert mrml.node_to_volume(node).meta["name"] == "target"
    mask = Volume(np.ones((1, 3, 3, 3), bool), np.eye(4))
    assert mrml.node_to_volume(mrml.volume_to_node(mask, scene)).numpy().dtype == np.uint8


def test_volume_errors():
    scene = new_scene()
    with pytest.raises(InputError, match="got complex data; convert to magnitude or phase"):
        mrml.volume_to_node(Volume(np.ones((1, 3, 3, 3), np.complex64), np.eye(4), "complex"), scene)
    with pytest.raises(InputError, match="use displacement_to_transform_node"):
        mrml.volume_to_node(Volume(np.zeros((3, 3, 3, 3)), np.eye(4), "displacement"), scene)
    with pytest.raises(InputError, match="expected 1 \\(scalar\\) or 3/4 \\(RGB/RGBA\\) channels.*got 2"):
        mrml.volume_to_node(Volume(np.zeros((2, 3, 3, 3), np.float32), np.eye(4)), scene)
    label_node = mrml.volume_to_node(Volume(np.zeros((1, 3, 3, 3), np.uint8), np.eye(4), "label"), scene)
    with pytest.raises(InputError, match="expected a vtkMRMLScalarVolumeNode for this intensity volume"):
        mrml.volume_to_node(Volume(np.zeros((1, 3, 3, 3), np.float32), np.eye(4)), scene, node=label_node)
    with pytest.raises(InputError, match="expected a vtkMRMLVolumeNode"):
        mrml.node_to_volume(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode"))
    with pytest.raises(InputError, match="scene: expected a vtkMRMLScene"):
        mrml.volume_to_node(Volume(np.zeros((1, 3, 3, 3)), np.eye(4)), None)


def test_extent_not_starting_at_zero_is_honoured():
    scene = new_scene()
    node = mrml.volume_to_node(Volume(np.arange(60, dtype=np.int16).reshape(1, 3, 4, 5), oblique_affine()), scene)
    image = node.GetImageData()
    image.SetExtent(2, 4, 1, 4, 3, 7)  # same voxels, indices shifted
    back = mrml.node_to_volume(node)
    np.testing.assert_allclose(back.affine[:3, 3], oblique_affine()[:3, :3] @ [2, 1, 3] + oblique_affine()[:3, 3])
    np.testing.assert_array_equal(back.numpy(), np.arange(60, dtype=np.int16).reshape(1, 3, 4, 5))


# -- transforms -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".h5", ".nii.gz"])
def test_transform_node_moves_points_like_itk_file(tmp_path, suffix):
    field = smooth_field(oblique_affine(), (14, 16, 12))
    scene = new_scene()
    node = mrml.displacement_to_transform_node(field, scene, "warp")
    assert node.GetClassName() == "vtkMRMLGridTransformNode"
    path = write_transform(field, tmp_path / f"warp{suffix}")
    if suffix == ".h5":
        itk = sitk.ReadTransform(str(path))
    else:
        itk = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    from_parent = node.GetTransformFromParent()
    # VTK interpolates between grid nodes in a slightly different floating-point order (~1e-6 mm).
    atol = 1e-4 if suffix == ".nii.gz" else 1e-5
    moved = 0.0
    for p in inside_points(field):
        q = np.array(from_parent.TransformPoint(p))
        np.testing.assert_allclose(q, itk_ras(itk, p), atol=atol)
        moved = max(moved, float(np.linalg.norm(q - p)))
    assert moved > 0.5  # the field really moves points


def test_mrml_transform_storage_and_itk_agree(tmp_path):
    field = smooth_field(oblique_affine(), (12, 10, 9))
    scene = new_scene()
    node = mrml.displacement_to_transform_node(field, scene, "warp")
    # MRML writes .h5, SimpleITK reads it.
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "mrml.h5"))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.WriteData(node) == 1
    itk = sitk.ReadTransform(str(tmp_path / "mrml.h5"))
    for p in inside_points(field):
        np.testing.assert_allclose(itk_ras(itk, p), node.GetTransformFromParent().TransformPoint(p), atol=1e-5)
    back = read_transform(tmp_path / "mrml.h5")
    np.testing.assert_allclose(back.numpy(), field.numpy(), atol=1e-12)
    np.testing.assert_allclose(back.affine, field.affine, atol=1e-9)

    # meddl writes .h5, MRML's storage node reads it into a grid transform node.
    write_transform(field, tmp_path / "meddl.h5")
    node2 = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "read")
    storage2 = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage2.SetFileName(str(tmp_path / "meddl.h5"))
    node2.SetAndObserveStorageNodeID(storage2.GetID())
    assert storage2.ReadData(node2) == 1
    read = mrml.transform_node_to_displacement(node2)
    np.testing.assert_allclose(read.numpy(), field.numpy(), atol=1e-12)
    np.testing.assert_allclose(read.affine, field.affine, atol=1e-9)


@pytest.mark.parametrize("nd", [3, 2])
def test_transform_node_round_trip(nd):
    shape = (10, 12, 9) if nd == 3 else (14, 11)
    field = smooth_field(oblique_affine(nd), shape)
    scene = new_scene()
    node = mrml.displacement_to_transform_node(field, scene)
    back = mrml.transform_node_to_displacement(node)
    assert back.kind.value == "displacement" and back.ndim == nd
    np.testing.assert_allclose(back.numpy(), field.numpy(), atol=1e-12)
    np.testing.assert_allclose(back.affine, field.affine, atol=1e-12)
    sampled = mrml.transform_node_to_displacement(node, reference=field)
    np.testing.assert_allclose(sampled.numpy(), field.numpy(), atol=1e-9)
    # In-plane points of a 2D field move as SimpleITK's 2D transform moves them.
    itk = sitk.DisplacementFieldTransform(mio.to_sitk(field))
    for p in inside_points(field, n=10):
        np.testing.assert_allclose(node.GetTransformFromParent().TransformPoint(p), itk_ras(itk, p, nd), atol=1e-5)
    same = mrml.displacement_to_transform_node(field.with_data(field.numpy() * 0.5), scene, node=node)
    assert same is node
    np.testing.assert_allclose(mrml.transform_node_to_displacement(node).numpy(), field.numpy() * 0.5)


def test_grid_stored_as_to_parent_is_inverted():
    field = smooth_field(oblique_affine(), (14, 14, 12))
    scene = new_scene()
    node = mrml.displacement_to_transform_node(field, scene)
    node.Inverse()  # the grid is now the "to parent" transform
    inverse = mrml.transform_node_to_displacement(node)
    assert inverse.meta.get("inverted") and inverse.same_grid(field)
    forward = sitk.DisplacementFieldTransform(mio.to_sitk(field))
    p = grid_points(field.affine, field.spatial_shape)[2:-2, 2:-2, 2:-2].reshape(-1, 3)
    u_inv = np.moveaxis(inverse.numpy(), 0, -1)[2:-2, 2:-2, 2:-2].reshape(-1, 3)
    back = np.array([itk_ras(forward, q) for q in p + u_inv])
    assert np.abs(u_inv).max() > 0.5
    np.testing.assert_allclose(back, p, atol=1e-5)


def test_linear_transform_node_needs_reference():
    scene = new_scene()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = np.eye(4)
    m[:3, :3] = rotation(0.1, 0.2, -0.1) * 1.05
    m[:3, 3] = [3.0, -2.0, 1.0]
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, m[r, c])
    node.SetMatrixTransformToParent(vm)
    with pytest.raises(InputError, match="expected a grid transform.*pass reference"):
        mrml.transform_node_to_displacement(node)
    reference = Volume(np.zeros((1, 5, 6, 4), np.float32), oblique_affine())
    field = mrml.transform_node_to_displacement(node, reference=reference)
    p = grid_points(reference.affine, reference.spatial_shape)
    expected = p @ np.linalg.inv(m)[:3, :3].T + np.linalg.inv(m)[:3, 3]  # from parent = inverse
    np.testing.assert_allclose(p + np.moveaxis(field.numpy(), 0, -1), expected, atol=1e-9)


# -- segmentations ----------------------------------------------------------------------------

SEGMENTS = [
    SegmentInfo(1, "liver", (0.8, 0.2, 0.1)),
    SegmentInfo(3, "left kidney", (0.1, 0.7, 0.3)),
    SegmentInfo(7, "spleen", (0.2, 0.3, 0.9)),
]


def three_labels(nd: int = 3) -> Volume:
    shape = (16, 14, 12) if nd == 3 else (16, 14)
    data = np.zeros((1,) + shape, np.uint8)
    if nd == 3:
        data[0, 2:7, 3:9, 2:8] = 1
        data[0, 8:14, 1:6, 4:10] = 3
        data[0, 9:12, 8:13, 1:4] = 7
    else:
        data[0, 2:7, 3:9] = 1
        data[0, 8:14, 1:6] = 3
        data[0, 9:12, 8:13] = 7
    return Volume(data, oblique_affine(nd), "label")


def assert_segments(infos: list[SegmentInfo], expected: list[SegmentInfo]) -> None:
    assert [(i.label, i.name) for i in infos] == [(e.label, e.name) for e in expected]
    for i, e in zip(infos, expected, strict=True):
        np.testing.assert_allclose(i.color, e.color, atol=1e-6)
        assert i.segment_id


@pytest.mark.parametrize("nd", [3, 2])
def test_segmentation_round_trip_keeps_names_colours_labels(nd):
    labels = three_labels(nd)
    scene = new_scene()
    node = mrml.labels_to_segmentation_node(labels, scene, SEGMENTS, name="organs")
    segmentation = node.GetSegmentation()
    assert node.GetName() == "organs" and segmentation.GetNumberOfSegments() == 3
    for n, info in enumerate(SEGMENTS):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == info.name
        np.testing.assert_allclose(segment.GetColor(), info.color, atol=1e-6)
        assert mrml._segment_label(segment) == info.label
    back, infos = mrml.segmentation_node_to_labels(node)
    assert_segments(infos, SEGMENTS)
    assert back.kind.value == "label" and back.ndim == nd and back.numpy().dtype == np.uint8
    np.testing.assert_array_equal(back.numpy(), labels.numpy())
    np.testing.assert_allclose(back.affine, labels.affine, atol=1e-9)
    # No temporary nodes are left behind.
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 0


def test_segmentation_labels_beyond_32767_duplicate_names_and_shared_tags_survive_a_round_trip():
    labels = three_labels(3)
    data = labels.numpy().astype(np.int32)
    big = labels.with_data(np.where(data == 7, 40000, data))  # values 1, 3, 40000
    scene = new_scene()
    node = mrml.labels_to_segmentation_node(big, scene, [SegmentInfo(1, "a", (1, 0, 0)), SegmentInfo(3, "organ", (0, 1, 0)),
                                                        SegmentInfo(40000, "organ", (0, 0, 1))])
    back, infos = mrml.segmentation_node_to_labels(node)
    np.testing.assert_array_equal(back.numpy(), big.numpy())  # the large value and both "organ" labels kept
    assert [(i.label, i.name) for i in infos] == [(1, "a"), (3, "organ"), (40000, "organ")]
    # a segment copied from another node may carry a tag an existing segment already has
    other = mrml.labels_to_segmentation_node(labels.with_data((data == 3).astype(np.uint8)), scene,
                                             [SegmentInfo(1, "spleen", (0.5, 0.5, 0.5))])
    mrml.copy_segments(other, node, ["spleen"])
    back, infos = mrml.segmentation_node_to_labels(node)
    spleen = [i.label for i in infos if i.name == "spleen"]
    assert spleen and spleen[0] not in (1, 3, 40000)  # a free value, not the tag "a" already has


def test_segmentation_export_onto_other_grids():
    labels = three_labels()
    scene = new_scene()
    node = mrml.labels_to_segmentation_node(labels, scene, SEGMENTS)

    # A grid shifted by whole voxels and larger than the labels: a crop/pad of the same voxels.
    shifted = labels.affine.copy()
    shifted[:3, 3] = labels.affine[:3, :3] @ [3, -2, 1] + labels.affine[:3, 3]
    reference = Volume(np.zeros((1, 15, 18, 13), np.float32), shifted)
    out, infos = mrml.segmentation_node_to_labels(node, reference=reference)
    assert out.same_grid(reference) and out.numpy().shape == (1, 15, 18, 13)
    expected = np.zeros((15, 18, 13), np.uint8)
    expected[0:13, 2:16, 0:11] = labels.numpy()[0, 3:16, 0:14, 1:12]
    np.testing.assert_array_equal(out.numpy()[0], expected)
    assert_segments(infos, SEGMENTS)

    # A three-times finer grid: nearest-neighbour resampling, as SimpleITK does it.
    fine = labels.affine.copy()
    fine[:3, :3] = labels.affine[:3, :3] / 3.0
    fine[:3, 3] = labels.affine[:3, 3] - labels.affine[:3, :3] @ [1 / 3, 1 / 3, 1 / 3]
    reference = Volume(np.zeros((1, 48, 42, 36), np.float32), fine)
    reference_node = mrml.volume_to_node(reference, scene, "fine grid")
    out, _ = mrml.segmentation_node_to_labels(node, reference=reference_node)
    expected = sitk.Resample(mio.to_sitk(labels), mio.to_sitk(reference), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(out.numpy()[0], sitk_array_ijk(expected))
    np.testing.assert_allclose(out.affine, fine, atol=1e-9)


def test_segment_subset_untagged_segments_and_update_in_place():
    labels = three_labels()
    scene = new_scene()
    node = mrml.labels_to_segmentation_node(labels, scene, SEGMENTS)
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(3)]
    # Paint order follows segment_ids; label values still come from the tags.
    out, infos = mrml.segmentation_node_to_labels(node, segment_ids=[ids[2], ids[0]])
    assert [i.label for i in infos] == [7, 1]
    assert set(np.unique(out.numpy())) == {0, 1, 7}
    np.testing.assert_array_equal(out.numpy() == 7, labels.numpy() == 7)
    # A segment without a label tag takes the smallest free value.
    segmentation.GetSegment(ids[1]).RemoveTag(mrml.LABEL_TAG)
    out, infos = mrml.segmentation_node_to_labels(node)
    assert [i.label for i in infos] == [1, 2, 7]
    np.testing.assert_array_equal(out.numpy() == 2, labels.numpy() == 3)
    with pytest.raises(InputError, match="segment_ids: nope not in"):
        mrml.segmentation_node_to_labels(node, segment_ids=["nope"])
    # Update in place: same node, new segments; listed labels without voxels become empty segments.
    node_id = node.GetID()
    extra = SEGMENTS[:1] + [SegmentInfo(9, "tumour", (1.0, 1.0, 0.0))]
    one = labels.with_data((labels.numpy() == 1).astype(np.uint8))
    same = mrml.labels_to_segmentation_node(one, scene, extra, node=node)
    assert same is node and node.GetID() == node_id
    out, infos = mrml.segmentation_node_to_labels(node)
    assert [(i.label, i.name) for i in infos] == [(1, "liver"), (9, "tumour")]
    np.testing.assert_array_equal(out.numpy(), one.numpy())


def test_segmentation_errors():
    scene = new_scene()
    with pytest.raises(InputError, match="expected a label volume"):
        mrml.labels_to_segmentation_node(Volume(np.zeros((1, 3, 3, 3), np.float32), np.eye(4)), scene)
    with pytest.raises(InputError, match="expected label values >= 0"):
        mrml.labels_to_segmentation_node(Volume(-np.ones((1, 3, 3, 3), np.int16), np.eye(4), "label"), scene)
    with pytest.raises(InputError, match="expected integer label values"):
        mrml.labels_to_segmentation_node(Volume(np.full((1, 3, 3, 3), 1.5), np.eye(4), "label"), scene)


# -- sequences and scenes ---------------------------------------------------------------------


def coil_volumes(n: int = 4) -> list[Volume]:
    rng = np.random.default_rng(5)
    return [Volume(rng.standard_normal((1, 6, 7, 5)).astype(np.float32), oblique_affine()) for _ in range(n)]


def test_sequence_round_trip(tmp_path):
    coils = coil_volumes()
    scene = new_scene()
    node = mrml.volumes_to_sequence_node(coils, scene, "coils")
    assert node.GetIndexName() == "coil" and node.GetNumberOfDataNodes() == 4
    for reader in (lambda: node, lambda: mrml.load_scene(mrml.save_scene(scene, tmp_path / "s.mrml"))):
        seq = reader()
        if seq.IsA("vtkMRMLScene"):
            seq = seq.GetFirstNodeByName("coils")
        back = mrml.sequence_node_to_volumes(seq)
        assert [v.meta["index"] for v in back] == ["0", "1", "2", "3"]
        for b, c in zip(back, coils, strict=True):
            np.testing.assert_array_equal(b.numpy(), c.numpy())
            np.testing.assert_allclose(b.affine, c.affine, atol=1e-9)
    with pytest.raises(InputError, match="at least one volume"):
        mrml.volumes_to_sequence_node([], scene)


def test_nodes_the_adapter_creates_hold_no_extra_reference():
    """CreateNodeByClass hands its caller a reference; the adapter gives it back (no leak per display node)."""
    scene = new_scene()
    node = mrml.volume_to_node(coil_volumes(1)[0], scene, "v")
    made = node.GetDisplayNode()
    # the same pair built with AddNewNodeByClass (the scene alone owns what it returns), as reference
    volume = scene.AddNewNodeByClass(node.GetClassName())
    plain = scene.AddNewNodeByClass(made.GetClassName())
    volume.SetAndObserveDisplayNodeID(plain.GetID())
    assert made.GetReferenceCount() == plain.GetReferenceCount()


def test_sequence_browser_only_where_the_sequences_module_is_there():
    scene = new_scene()
    sequence = mrml.volumes_to_sequence_node(coil_volumes(2), scene, "coils")
    # Slicer's core libraries register no browser class: no browser, no error
    assert not scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode")
    assert mrml.browse_sequence(sequence, scene) is None
    # where the Sequences module is there (the application registers the class), a browser of the sequence
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    browser = mrml.browse_sequence(sequence, scene)
    assert browser is not None and browser.GetMasterSequenceNode().GetID() == sequence.GetID()
    assert browser.GetName() == "coils browser"
    with pytest.raises(InputError, match="sequence: expected a vtkMRMLSequenceNode"):
        mrml.browse_sequence(scene.GetFirstNodeByName("v") or sequence.GetDataNodeAtValue("0"), scene)


def build_scene():
    scene = new_scene()
    volumes = {
        "t1": mio.from_sitk(sitk_oblique_image(3, "float32", seed=1)),
        "ct": mio.from_sitk(sitk_oblique_image(3, "int16", seed=2)),
        "photo": mio.from_sitk(sitk_oblique_image(3, "rgb", seed=3)),
        "slice": mio.from_sitk(sitk_oblique_image(2, "float32", seed=4)),
        "labels": three_labels(),
    }
    for name, volume in volumes.items():
        mrml.volume_to_node(volume, scene, name)
    mrml.labels_to_segmentation_node(three_labels(), scene, SEGMENTS, name="organs")
    field = smooth_field(oblique_affine(), (10, 9, 8))
    mrml.displacement_to_transform_node(field, scene, "warp")
    mrml.volumes_to_sequence_node(coil_volumes(), scene, "coils")
    return scene, volumes, field


@pytest.mark.parametrize("suffix", [".mrml", ".mrb"])
def test_saved_scene_reloads_with_all_nodes(tmp_path, suffix):
    scene, volumes, field = build_scene()
    path = mrml.save_scene(scene, tmp_path / "out" / f"study{suffix}")
    assert path.is_file() and not [p for p in path.parent.iterdir() if "part" in p.name]
    if suffix == ".mrb":
        names = zipfile.ZipFile(path).namelist()
        assert "study/study.mrml" in names and any(n.startswith("study/Data/") for n in names)
    else:
        assert {p.name for p in path.parent.iterdir()} >= {"t1.nrrd", "organs.seg.nrrd", "warp.h5", "study.mrml"}
    loaded = mrml.load_scene(path)
    for name, volume in volumes.items():
        back = mrml.node_to_volume(loaded.GetFirstNodeByName(name))
        assert back.kind == volume.kind and back.ndim == volume.ndim
        np.testing.assert_array_equal(back.numpy(), volume.numpy())
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    labels, infos = mrml.segmentation_node_to_labels(loaded.GetFirstNodeByName("organs"))
    assert_segments(infos, SEGMENTS)
    np.testing.assert_array_equal(labels.numpy(), three_labels().numpy())
    np.testing.assert_allclose(labels.affine, three_labels().affine, atol=1e-9)
    warp_back = mrml.transform_node_to_displacement(loaded.GetFirstNodeByName("warp"))
    np.testing.assert_allclose(warp_back.numpy(), field.numpy(), atol=1e-12)
    np.testing.assert_allclose(warp_back.affine, field.affine, atol=1e-9)
    coils = mrml.sequence_node_to_volumes(loaded.GetFirstNodeByName("coils"))
    for b, c in zip(coils, coil_volumes(), strict=True):
        np.testing.assert_array_equal(b.numpy(), c.numpy())


def test_scene_errors(tmp_path):
    scene = new_scene()
    with pytest.raises(InputError, match="unknown format '.xml'; expected .mrml or .mrb"):
        mrml.save_scene(scene, tmp_path / "scene.xml")
    with pytest.raises(InputError, match="no such file"):
        mrml.load_scene(tmp_path / "missing.mrml")
