"""SimpleITK converter and file I/O: values, dtypes and physical positions survive every trip."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from meddl import io
from meddl.errors import InputError
from meddl.volume import Kind, Volume

LPS = np.array([-1.0, -1.0, 1.0])
KINDS = ["float", "int16", "rgb", "label", "complex", "displacement"]


def _sitk_ras(image: sitk.Image, index: tuple[int, ...]) -> np.ndarray:
    """RAS position of a voxel according to SimpleITK (its answer is LPS)."""
    p = np.zeros(3)
    p[: image.GetDimension()] = image.TransformIndexToPhysicalPoint([int(i) for i in index])
    return p * LPS


def _probe_indices(vol: Volume) -> list[tuple[int, ...]]:
    shape = vol.spatial_shape
    return [tuple(0 for _ in shape), tuple(s - 1 for s in shape), tuple(s // 2 for s in shape), tuple(min(1, s - 1) for s in shape)]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_sitk_round_trip_keeps_values_dtype_and_positions(volume_factory, kind, ndim):
    vol = volume_factory(kind, ndim)
    image = io.to_sitk(vol)
    assert image.GetDimension() == ndim
    assert list(image.GetSize()) == list(vol.spatial_shape)
    for idx in _probe_indices(vol):
        np.testing.assert_allclose(_sitk_ras(image, idx)[:ndim], vol.index_to_physical(np.array(idx))[:ndim], atol=1e-9)
        pixel = np.atleast_1d(np.asarray(image[tuple(int(i) for i in idx)]))
        expected = vol.data[(slice(None), *idx)]
        if kind == "displacement":
            expected = expected * LPS[:ndim]  # stored as LPS components
        np.testing.assert_allclose(pixel, expected, rtol=1e-6)
    back = io.from_sitk(image, kind=vol.kind)
    assert back.kind is vol.kind
    assert back.data.dtype == vol.data.dtype
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine[:, :ndim], vol.affine[:, :ndim], atol=1e-12)
    np.testing.assert_allclose(back.affine[:ndim, 3], vol.affine[:ndim, 3], atol=1e-12)



@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (1, 7, 1, 2), (2, 5, 3), (3, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.complex64])
def test_layout_copy_equals_numpy_transpose_both_ways(rng, shape, dtype):
    """The plane-by-plane copy behind to_sitk / from_sitk against numpy's whole-array transpose."""
    data = (rng.normal(size=shape) * 100).astype(dtype)
    nd = len(shape) - 1
    to_itk = np.transpose(data, (*range(nd, 0, -1), 0))  # (C, I, J[, K]) -> (K, J, I, C)
    signs = np.array([-1, -1, 1][: shape[0]] + [1] * max(0, shape[0] - 3))
    wide = np.result_type(dtype, np.float64)  # float64 as for displacements (complex128 for complex input)
    out = io._reverse_layout(data, channels_first=True, dtype=wide, negate=(0, 1))
    assert out.flags["C_CONTIGUOUS"] and out.dtype == wide
    np.testing.assert_array_equal(out, to_itk.astype(wide) * signs)
    plain = io._reverse_layout(data, channels_first=True, dtype=data.dtype)
    assert plain.dtype == data.dtype
    np.testing.assert_array_equal(plain, to_itk)
    back = io._reverse_layout(np.ascontiguousarray(to_itk), channels_first=False, dtype=data.dtype)
    assert back.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(back, data)

@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["float", "int16", "label", "rgb"])
def test_file_round_trip(tmp_path, volume_factory, kind, suffix):
    vol = volume_factory(kind, 3)
    path = io.write(vol, tmp_path / f"v{suffix}")
    back = io.read(path, kind=vol.kind)
    np.testing.assert_array_equal(back.data, vol.data)
    assert back.data.dtype == vol.data.dtype
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)  # NIfTI stores float32 geometry


def test_nifti_written_by_us_is_read_by_nibabel_with_the_same_ras_affine(tmp_path, volume_factory):
    """Write with one library, read with another: nibabel's affine is RAS with (i, j, k) axes, like a Volume."""
    vol = volume_factory("float", 3)
    path = io.write(vol, tmp_path / "v.nii.gz")
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.data[0])


def test_nifti_written_by_nibabel_is_read_by_us(tmp_path, oblique, rng):
    data = rng.normal(size=(6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, oblique(3)), str(tmp_path / "n.nii.gz"))
    vol = io.read(tmp_path / "n.nii.gz")
    np.testing.assert_allclose(vol.affine, oblique(3), atol=1e-5)
    np.testing.assert_array_equal(vol.data[0], data)


@pytest.mark.parametrize("suffix,kind", [(".nii.gz", None), (".nrrd", None), (".mha", "complex")])
def test_complex_volume_round_trips(tmp_path, volume_factory, suffix, kind):
    """NIfTI and NRRD know complex voxels; MetaImage stores (real, imaginary) channels, so ask for complex."""
    vol = volume_factory("complex", 3)
    back = io.read(io.write(vol, tmp_path / f"c{suffix}"), kind=kind)
    assert back.kind is Kind.COMPLEX
    np.testing.assert_array_equal(back.data, vol.data)


def test_displacement_round_trips_through_nifti(tmp_path, volume_factory):
    vol = volume_factory("displacement", 3)
    back = io.read(io.write(vol, tmp_path / "d.nii.gz"), kind="displacement")
    np.testing.assert_allclose(back.data, vol.data)


def test_rgb_png_round_trip(tmp_path, rng):
    rgb = rng.integers(0, 256, size=(3, 20, 13)).astype(np.uint8)
    vol = Volume(rgb, np.eye(4))
    back = io.read(io.write(vol, tmp_path / "slide.png"))
    assert back.ndim == 2 and back.channels == 3
    np.testing.assert_array_equal(back.data, rgb)


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_a_grey_picture_saved_in_colour_reads_as_grey(tmp_path, rng, mode):
    """ITK's example brain slices are palette or RGB PNGs with R = G = B: they read as one grey channel."""
    from PIL import Image

    grey = rng.integers(0, 256, size=(9, 14)).astype(np.uint8)  # (rows, cols)
    Image.fromarray(grey, "L").convert(mode).save(tmp_path / "slice.png")
    vol = io.read(tmp_path / "slice.png")
    assert vol.channels == 1 and vol.spatial_shape == (14, 9)
    np.testing.assert_array_equal(vol.data[0], grey.T)
    assert "grey" in vol.meta["stored_as"]
    # one channel differing anywhere keeps the colour image
    colour = np.repeat(grey[..., None], 3, axis=2)
    colour[4, 7, 2] ^= 1
    Image.fromarray(colour, "RGB").save(tmp_path / "colour.png")
    assert io.read(tmp_path / "colour.png").channels == 3
    with pytest.raises(InputError, match=r"got 1 component\(s\) \(a grey image stored as RGB with R = G = B\)"):
        from meddl.volume import require

        require(vol, "input", rgb=True)
    # any of its three channels is the grey one
    from meddl.volume import component

    assert component(vol, "2") is vol and component(vol, "grey") is vol
    # only colour pictures: a float three-component TIFF of equal channels is not one
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "three.tif", np.zeros((9, 14, 3), np.float32), photometric="rgb")
    assert io.read(tmp_path / "three.tif").channels == 3


def test_rgb_tiff_is_read_with_pixel_rows_on_j(tmp_path, rng):
    """A TIFF's (rows, cols, 3) array becomes (3, cols, rows): i runs along a row."""
    tifffile = pytest.importorskip("tifffile")
    pixels = rng.integers(0, 256, size=(8, 5, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", pixels, photometric="rgb")
    vol = io.read(tmp_path / "slide.tif")
    assert vol.channels == 3 and vol.spatial_shape == (5, 8)
    np.testing.assert_array_equal(vol.data, np.transpose(pixels, (2, 1, 0)))


def test_dicom_series_round_trip_keeps_geometry(tmp_path, oblique, rng):
    data = rng.integers(-500, 1500, size=(1, 6, 7, 4)).astype(np.int16)
    vol = Volume(data, oblique(3))
    io.write_dicom_series(vol, tmp_path / "dicom")
    back = io.read(tmp_path / "dicom")
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    assert back.meta["series_uid"]


def test_write_refuses_unknown_suffix_and_float_png(tmp_path, volume_factory):
    with pytest.raises(InputError, match=r"unknown format '\.xyz'"):
        io.write(volume_factory("float", 3), tmp_path / "out.xyz")
    with pytest.raises(InputError, match=r"8/16-bit integers, got float32"):
        io.write(volume_factory("float", 2), tmp_path / "out.png")


def test_failed_write_leaves_no_partial_file(tmp_path, volume_factory, monkeypatch):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous result")

    def boom(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(InputError, match="cannot write"):
        io.write(volume_factory("float", 3), target)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nhdr"])
def test_an_output_under_a_file_is_one_error_line_not_a_crash(tmp_path, volume_factory, capsys, name):
    from meddl.cli import main

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match=r"cannot write '.*file/sub/" + name.replace(".", r"\.")
                       + r"': '.*file' is a file, not a folder"):
        io.write(volume_factory("float", 3), tmp_path / "file" / "sub" / name)
    io.write(volume_factory("float", 3), tmp_path / "in.nii.gz")
    assert main(["convert", str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / "file" / name)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write")


def test_read_reports_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(InputError, match=r"no such file"):
        io.read(tmp_path / "absent.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"the file is empty"):
        io.read(tmp_path / "empty.nii.gz")
    (tmp_path / "notes.nii").write_text("not an image at all")
    with pytest.raises(InputError, match=r"cannot read .*notes\.nii"):
        io.read(tmp_path / "notes.nii")


@pytest.mark.parametrize("how", ["raw", "gzip-of-cut-data", "cut-gzip-stream"])
def test_read_reports_truncated_nifti(tmp_path, volume_factory, how):
    """ITK fills a cut NIfTI with zeros without a word; we refuse it."""
    full = io.write(volume_factory("float", 3), tmp_path / "full.nii")
    raw = full.read_bytes()
    cut = raw[: 352 + (len(raw) - 352) // 2]
    if how == "raw":
        path, payload = tmp_path / "cut.nii", cut
    elif how == "gzip-of-cut-data":
        path, payload = tmp_path / "cut.nii.gz", gzip.compress(cut)
    else:
        whole = gzip.compress(raw)
        path, payload = tmp_path / "cut.nii.gz", whole[: len(whole) * 2 // 3]
    path.write_bytes(payload)
    with pytest.raises(InputError, match=r"cannot read .*(truncated|corrupt)"):
        io.read(path)


def test_4d_image_is_refused_with_its_size(tmp_path):
    image = sitk.Image([4, 5, 6, 3], sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "series.nii.gz"))
    with pytest.raises(InputError, match=r"expected 2D or 3D, got 4D \(size \[4, 5, 6, 3\]\)"):
        io.read(tmp_path / "series.nii.gz")


def test_label_kind_refuses_fractional_values(tmp_path, volume_factory):
    path = io.write(volume_factory("float", 3), tmp_path / "f.nii.gz")
    with pytest.raises(InputError, match=r"expected integer labels"):
        io.read(path, kind="label")


def test_dicom_folder_without_series_is_refused(tmp_path, capfd):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("nothing here")
    with pytest.raises(InputError, match=r"holds no DICOM series"):
        io.read(tmp_path / "d")
    assert "WARNING" not in capfd.readouterr().err  # ITK's own warning is not printed beside the error


@pytest.mark.parametrize("damage", ["missing", "duplicate", "truncated"])
def test_dicom_series_with_a_missing_repeated_or_broken_slice_is_refused(tmp_path, rng, capfd, damage):
    vol = Volume(rng.normal(100, 10, (1, 12, 10, 8)).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    files = sorted(io.write_dicom_series(vol, tmp_path / "dicom"))
    assert io.read(tmp_path / "dicom").spatial_shape == (12, 10, 8)  # intact
    victim = files[3]
    if damage == "missing":
        victim.unlink()
    elif damage == "duplicate":
        (tmp_path / "dicom" / "copy.dcm").write_bytes(victim.read_bytes())
    else:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(InputError, match=r"DICOM series in '.*dicom': its \d+ slices are not evenly spaced \(usual "
                                         r"step 2 mm, also .*\): a slice is missing, repeated or unreadable"):
        io.read(tmp_path / "dicom")
    assert "WARNING" not in capfd.readouterr().err


def test_dicom_series_with_rounded_positions_or_images_sharing_positions(tmp_path, rng):
    import SimpleITK as sitk

    vol = Volume(rng.normal(100, 10, (1, 6, 5, 8)).astype(np.int16), np.diag([1.0, 1.0, 0.35, 1.0]))
    files = sorted(io.write_dicom_series(vol, tmp_path / "d"))

    def rewrite(path, z):  # ImagePositionPatient with one decimal, as some scanners store it
        image = sitk.ReadImage(str(path))
        for key in image.GetMetaDataKeys():
            image.SetMetaData(key, image.GetMetaData(key))
        x, y, _ = (float(v) for v in image.GetMetaData("0020|0032").split("\\"))
        image.SetMetaData("0020|0032", f"{x:g}\\{y:g}\\{z:.1f}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(path))
        writer.Execute(image)

    for i, path in enumerate(files):
        rewrite(path, 0.35 * i)
    assert io.read(tmp_path / "d").spatial_shape[2] == 8  # 0.3 / 0.4 mm steps of rounding: read
    for i, path in enumerate(files):
        rewrite(path, 2.0 * (i // 2))  # two images per position: two echoes in one series
    with pytest.raises(InputError, match=r"several of its 8 images share a slice position \(echoes"):
        io.read(tmp_path / "d")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_is_reported(tmp_path, volume_factory):
    path = io.write(volume_factory("float", 3), tmp_path / "locked.nii.gz")
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        io.read(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd"])
def test_nonfinite_voxels_survive_reading(tmp_path, volume_factory, suffix):
    """ITK's NIfTI reader turns NaN into 0; we put them back so bad input is caught, not hidden."""
    vol = volume_factory("float", 3)
    data = vol.numpy().copy()
    data[0, 1, 2, 3] = np.nan
    data[0, 4, 0, 1] = -np.inf
    back = io.read(io.write(vol.with_data(data), tmp_path / f"nan{suffix}"))
    np.testing.assert_array_equal(np.argwhere(~np.isfinite(back.data)), [[0, 1, 2, 3], [0, 4, 0, 1]])
    np.testing.assert_array_equal(back.data[np.isfinite(back.data)], data[np.isfinite(data)])


def test_tiled_tiff_opaque_alpha_is_dropped(tmp_path, rng):
    """ITK reads tiled TIFFs as RGBA; an alpha that is opaque everywhere carries nothing."""
    tifffile = pytest.importorskip("tifffile")
    pixels = rng.integers(0, 256, size=(32, 48, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "tiled.tif", pixels, photometric="rgb", tile=(16, 16))
    vol = io.read(tmp_path / "tiled.tif")
    assert vol.channels == 3
    np.testing.assert_array_equal(vol.data, np.transpose(pixels, (2, 1, 0)))


def test_a_nifti_whose_qform_and_sform_disagree_gets_a_notice(tmp_path, capsys):
    """mricron's Harvard-Oxford atlas: a qform without the y/z origin, a correct sform; ITK reads the qform."""
    import json

    import nibabel as nib
    from meddl.cli import main

    data = np.zeros((12, 10, 8), np.int16)
    data[3:6, 2:5, 1:4] = 1
    sform = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    qform = sform.copy()
    qform[1:3, 3] = 0.0
    img = nib.Nifti1Image(data, sform)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=2)
    nib.save(img, tmp_path / "odd.nii.gz")
    vol = io.read(tmp_path / "odd.nii.gz")
    assert "qform and sform disagree (origins 145.1 mm apart)" in vol.meta["geometry_notice"]
    assert main(["info", str(tmp_path / "odd.nii.gz"), "--json"]) == 0
    assert "read with the qform" in json.loads(capsys.readouterr().out)["notice"]
    # consistent forms: nothing to say
    img.set_qform(sform, code=2)
    nib.save(img, tmp_path / "fine.nii.gz")
    assert "geometry_notice" not in io.read(tmp_path / "fine.nii.gz").meta


def test_a_2d_slice_placed_in_3d_keeps_its_position_and_orientation(tmp_path):
    from meddl.volume import affine_from_geometry

    data = np.arange(20, dtype=np.float32).reshape(1, 4, 5)
    axial_up = Volume(data, affine_from_geometry([1.0, 2.0, 3.0], [5.0, -4.0, 50.0]))  # at z = 50 mm
    coronal = Volume(data, np.array([[1.0, 0, 0, 5.0], [0, 0, 1.0, -4.0], [0, 2.0, 0, 50.0], [0, 0, 0, 1]]))
    for vol in (axial_up, coronal):
        for name in ("s.nii.gz", "s.nrrd", "s.mha"):
            back = io.read(io.write(vol, tmp_path / name))
            assert back.spatial_shape[:2] == (4, 5)
            np.testing.assert_allclose(back.affine @ [1, 2, 0, 1], vol.affine @ [1, 2, 0, 1], atol=1e-5)
            np.testing.assert_array_equal(back.numpy().reshape(data.shape), data)
    with pytest.raises(InputError, match=r"2D image: its rows and columns do not span the x-y plane"):
        io.to_sitk(coronal)
    flat = Volume(data, affine_from_geometry([1.0, 2.0], [5.0, -4.0]))
    assert io.read(io.write(flat, tmp_path / "flat.nii.gz")).ndim == 2  # an ordinary 2D image stays 2D


def test_a_file_with_unusable_geometry_is_named_in_the_error(tmp_path):
    image = sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32))
    image.SetSpacing((1e-6, 1e-6, 1e-6))
    sitk.WriteImage(image, str(tmp_path / "tiny.nii.gz"))
    with pytest.raises(InputError, match=r"cannot read '.*tiny\.nii\.gz': its geometry is unusable \(spacing "
                                         r"1e-06 x 1e-06 x 1e-06 mm\): volume affine: the 3x3 part is singular"):
        io.read(tmp_path / "tiny.nii.gz")
