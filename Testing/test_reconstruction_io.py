"""fastMRI / ISMRMRD readers, geometry, and every bad input the issue lists (error line, exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from meddl.cli import main
from meddl.errors import InputError
from meddl.reconstruction import read_kspace
from meddl.reconstruction.fastmri import read_fastmri, write_fastmri
from meddl.reconstruction.kspace import Header, header_xml, parse_header
from meddl.reconstruction.masks import equispaced_mask


def _kspace(rng, shape=(3, 4, 32, 24)) -> np.ndarray:
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def test_header_round_trip_and_fastmri_padding():
    h = Header((640, 368, 1), (280.0, 140.0, 4.5), (320, 320, 1), (140.0, 140.0, 3.0), (0, 329, 165), 35, 15)
    back = parse_header(header_xml(h))
    assert back == h
    # fastMRI: padding_left = enc_y // 2 - center, padding_right = padding_left + maximum + 1
    assert back.padding == (184 - 165, 184 - 165 + 330)


def test_synthetic_fastmri_file_round_trip_with_geometry(tmp_path, rng):
    k = _kspace(rng)
    mask = equispaced_mask(24, 4, 0.17, rng)
    target = rng.uniform(size=(3, 16, 24)).astype(np.float32)
    path = write_fastmri(
        tmp_path / "f.h5",
        k * mask,
        fov_mm=(200.0, 150.0, 4.0),
        recon_matrix=(16, 24),
        mask=mask,
        target=target,
        acquisition="CORPD_FBK",
    )
    data = read_kspace(path)
    assert data.format == "fastmri"
    np.testing.assert_array_equal(data.kspace, k * mask)
    np.testing.assert_array_equal(data.mask, mask)
    np.testing.assert_array_equal(data.target, target)
    assert data.image_shape == (16, 24)
    assert data.attrs["acquisition"] == "CORPD_FBK"
    with h5py.File(path, "r+") as f:  # an array-valued attribute is left out, not fatal
        f.attrs["window"] = np.array([1, 2, 3])
    assert "window" not in read_kspace(path).attrs
    affine = data.affine()
    # pixel spacing = recon FOV / recon matrix (readout 100/16, phase 150/24), slice = the z FOV
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [6.25, 6.25, 4.0])
    centre = affine @ np.array([7.5, 11.5, 1.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    info = data.info()
    assert info["coils"] == 4 and info["slices"] == 3
    assert info["acceleration"] == pytest.approx(24 / mask.sum(), abs=1e-3)


def test_slice_spacing_is_the_recon_thickness_not_the_oversampled_encoded_one(tmp_path, rng):
    k = _kspace(rng, (2, 4, 32, 24))
    path = write_fastmri(tmp_path / "knee.h5", k, fov_mm=(200.0, 150.0, 4.0))
    # as fastMRI's knee headers: encoded z 4.5 mm (slice oversampling), recon z 3 mm (the thickness)
    hdr = Header((32, 24, 1), (200.0, 150.0, 4.5), (32, 24, 1), (200.0, 150.0, 3.0), (0, 23, 12), 2, 4)
    with h5py.File(path, "r+") as f:
        del f["ismrmrd_header"]
        f.create_dataset("ismrmrd_header", data=header_xml(hdr).encode())
    data = read_kspace(path)
    assert np.linalg.norm(data.affine()[:3, 2]) == pytest.approx(3.0) and data.geometry_notice() is None


def test_a_header_without_field_of_view_gives_1_mm_and_says_so(tmp_path, rng, capsys):
    k = _kspace(rng, (2, 4, 32, 24))
    known = read_kspace(write_fastmri(tmp_path / "known.h5", k, fov_mm=(200.0, 150.0, 4.0)))
    assert known.geometry_notice() is None
    blank = read_kspace(write_fastmri(tmp_path / "blank.h5", k, fov_mm=(0.0, 0.0, 0.0)))
    np.testing.assert_allclose(np.linalg.norm(blank.affine()[:3, :3], axis=0), [1.0, 1.0, 1.0])
    assert "1 mm pixels assumed" in blank.geometry_notice() and "1 mm slice spacing" in blank.geometry_notice()
    out = tmp_path / "r.nii.gz"
    assert main(["reconstruct", str(tmp_path / "blank.h5"), "--method", "zero-filled", "-o", str(out)]) == 0
    assert "notice: " in (out_text := capsys.readouterr().out) and "1 mm pixels assumed" in out_text


def test_single_coil_file_and_slice_selection(tmp_path, rng):
    k = _kspace(rng, (4, 16, 12))
    path = write_fastmri(tmp_path / "s.h5", k)
    data = read_fastmri(path, slices=(2, 1, 2))  # any order, repeats merged
    assert data.single_coil and data.kspace.shape == (2, 1, 16, 12)
    np.testing.assert_array_equal(data.kspace[:, 0], k[[1, 2]])
    with pytest.raises(InputError, match="--slices: expected indices in 0..3"):
        read_fastmri(path, slices=(7,))
    with pytest.raises(InputError, match=r"--slices: expected indices in 0..3 for 's\.h5', got \[-1\]"):
        read_fastmri(path, slices=(-1,))
    # one volume holds neighbouring slices: a gap would put slices 0 and 2 one spacing apart
    with pytest.raises(InputError, match=r"--slices: expected consecutive slices .* got 0, 2 .* range such as 0:3"):
        read_fastmri(path, slices=(2, 0))
    with pytest.raises(InputError, match=r"--slices: expected at least one slice index"):
        read_fastmri(path, slices=())
    # the same rules for k-space already in memory
    from meddl.reconstruction import ReconstructionConfig, reconstruct

    with pytest.raises(InputError, match=r"--slices: expected consecutive slices"):
        reconstruct(read_fastmri(path), ReconstructionConfig(method="zero-filled", slices=(0, 2)))


def test_ismrmrd_file_written_with_the_package_reads_back(tmp_path, rng):
    pytest.importorskip("ismrmrd")
    from meddl.reconstruction.ismrmrd_io import write_ismrmrd

    k = _kspace(rng, (2, 3, 16, 12))
    path = write_ismrmrd(tmp_path / "raw.h5", k, fov_mm=(160.0, 120.0, 5.0), oversampling=2)
    with h5py.File(path, "r") as f:
        assert f["dataset/data"].shape == (2 * 12,)
    data = read_kspace(path)
    assert data.format == "ismrmrd"
    assert data.kspace.shape == (2, 3, 16, 12)  # readout oversampling removed
    np.testing.assert_allclose(data.kspace, k, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(data.affine()[:3, :3], axis=0), [10.0, 10.0, 5.0])


def _ismrmrd_with(path: Path, nz: int = 1, counter: str | None = None) -> Path:
    """A tiny 2-coil ISMRMRD file; ``nz`` partitions, or line 3 with ``counter`` = 1."""
    import ismrmrd
    from meddl.reconstruction.kspace import Header, header_xml

    c, h, w = 2, 16, 12
    hdr = Header((h, w, nz), (100.0, 100.0, 10.0), (h, w, nz), (100.0, 100.0, 10.0), (0, w - 1, w // 2), 1, c)
    d = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    d.write_xml_header(header_xml(hdr).encode())
    for kz in range(nz):
        for ky in range(w):
            a = ismrmrd.Acquisition.from_array(np.full((c, h), 1 - 2 * kz + 0.1j, np.complex64), center_sample=h // 2)
            a.idx.kspace_encode_step_1 = ky
            a.idx.kspace_encode_step_2 = kz
            if counter and ky == 3:
                setattr(a.idx, counter, 1)
            d.append_acquisition(a)
    d.close()
    return path


@pytest.mark.parametrize("nz, counter, message", [
    (2, None, r"a 3D Cartesian acquisition \(encoded matrix z = 2\); only 2D"),
    (1, "contrast", r"acquisition 3 has contrast 1; several partitions, contrasts \(echoes\)"),
    (1, "set", r"acquisition 3 has set 1;"),
])
def test_ismrmrd_data_that_would_be_averaged_into_one_image_is_refused(tmp_path, nz, counter, message):
    pytest.importorskip("ismrmrd")
    with pytest.raises(InputError, match=message):
        read_kspace(_ismrmrd_with(tmp_path / "raw.h5", nz, counter))
    assert read_kspace(_ismrmrd_with(tmp_path / "plain.h5")).kspace.shape == (1, 2, 16, 12)


def test_ismrmrd_repetitions_are_averaged_and_different_samplings_merged_with_a_notice(tmp_path, capsys):
    """Repetitions of the same lines are averaged; repetitions of other lines (each 2x undersampled,
    interleaved) are merged, and the reader says so."""
    ismrmrd = pytest.importorskip("ismrmrd")
    from meddl.reconstruction.kspace import Header, header_xml

    c, h, w = 2, 16, 12

    def write(path: Path, lines_of) -> Path:
        hdr = Header((h, w, 1), (100.0, 100.0, 10.0), (h, w, 1), (100.0, 100.0, 10.0), (0, w - 1, w // 2), 1, c)
        d = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
        d.write_xml_header(header_xml(hdr).encode())
        for rep in range(2):
            for ky in lines_of(rep):
                a = ismrmrd.Acquisition.from_array(np.full((c, h), ky + 10 * rep + 1j, np.complex64), center_sample=h // 2)
                a.idx.kspace_encode_step_1 = ky
                a.idx.repetition = rep
                d.append_acquisition(a)
        d.close()
        return path

    same = read_kspace(write(tmp_path / "same.h5", lambda rep: range(w)))
    np.testing.assert_allclose(same.kspace[0, 0, 0], np.arange(w) + 5 + 1j)  # the mean of the two repetitions
    assert same.attrs["repetitions"] == 2 and same.attrs["notice"].startswith("2 repetitions of the same k-space lines "
                                                                              "were averaged")
    path = write(tmp_path / "interleaved.h5", lambda rep: range(rep, w, 2))
    merged = read_kspace(path)
    np.testing.assert_allclose(merged.kspace[0, 0, 0], np.arange(w) + 10 * (np.arange(w) % 2) + 1j)
    assert re.search(r"2 repetitions sample different k-space lines; they were merged", merged.attrs["notice"])
    assert main(["reconstruct", str(path), "-o", str(tmp_path / "x.nii.gz"), "--method", "zero-filled",
                 "--progress", "none"]) == 0
    assert "notice: " in capsys.readouterr().out
    # one repetition as acquired: its own lines only, the others empty
    one = read_kspace(path, repetition=1)
    want = np.where(np.arange(w) % 2 == 1, np.arange(w) + 10 + 1j, 0)
    np.testing.assert_allclose(one.kspace[0, 0, 0], want)
    assert one.attrs == {"repetitions": 2, "repetition": 1} and one.sampling().acceleration == pytest.approx(2.0)
    for args, message in ((["--repetition", "2"], r"expected one of the file's repetitions \(0, 1\), got 2"),
                          (["--repetition", "-1"], r"expected a repetition number >= 0, got -1")):
        assert main(["reconstruct", str(path), "-o", str(tmp_path / "y.nii.gz"), *args]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    fastmri = write_fastmri(tmp_path / "f.h5", _kspace(np.random.default_rng(0)))
    with pytest.raises(InputError, match=r"--repetition: '.*f.h5' is fastMRI data, which has no repetition counter"):
        read_kspace(fastmri, repetition=0)


# -- bad input -------------------------------------------------------------------------------


def _write(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


def _header(h=32, w=24) -> bytes:
    return header_xml(Header((h, w, 1), (200.0, 150.0, 4.0), (h, w, 1), (200.0, 150.0, 4.0))).encode()


def _bad_files(tmp: Path, rng) -> dict[str, tuple[Path, str]]:
    k = _kspace(rng)
    files = {
        "missing kspace": (
            _write(tmp / "nok.h5", ismrmrd_header=_header(), reconstruction_rss=np.ones((3, 8, 8))),
            "expected a dataset 'kspace'",
        ),
        "real data": (_write(tmp / "real.h5", kspace=np.abs(k), ismrmrd_header=_header()), "expected complex k-space"),
        "shape vs header": (
            _write(tmp / "shape.h5", kspace=k, ismrmrd_header=_header(40, 24)),
            "disagrees with the header",
        ),
        "no header": (_write(tmp / "nohdr.h5", kspace=k), "expected an 'ismrmrd_header'"),
    }
    text = tmp / "notes.h5"
    text.write_text("this is not HDF5\n" * 20)
    files["text file"] = (text, "expected an HDF5 file")
    picture = tmp / "slice.mha"
    picture.write_bytes(b"ObjectType = Image\nNDims = 2\n" + bytes(64))
    files["an image"] = (picture, "an image, not k-space: simulate its k-space first with meddl simulate-kspace")
    good = write_fastmri(tmp / "good.h5", k)
    cut = tmp / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (cut, "corrupt or truncated")
    mask = np.zeros(24, bool)
    mask[::4] = True
    mask[11:13] = True  # a 2-line centre: too narrow to calibrate
    files["no calibration"] = (write_fastmri(tmp / "nocal.h5", k * mask, mask=mask), "calibration")
    return files


@pytest.mark.parametrize(
    "case", ["missing kspace", "real data", "shape vs header", "no header", "text file", "an image", "truncated",
             "no calibration"]
)
def test_bad_input_gives_one_error_line_and_exit_2(case, tmp_path, rng, capsys):
    path, message = _bad_files(tmp_path, rng)[case]
    code = main(
        [
            "reconstruct",
            str(path),
            "-o",
            str(tmp_path / "out.nii.gz"),
            "--method",
            "cg-sense",
            "--progress",
            "none",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:")
    assert message in err[0]
    assert not (tmp_path / "out.nii.gz").exists()


def test_bad_input_raises_input_error_in_the_library(tmp_path, rng):
    for path, message in _bad_files(tmp_path, rng).values():
        if "calibration" in message:
            continue
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_kspace(path)


def test_fastmri_zero_padding_band_is_not_undersampling(tmp_path, rng):
    k = _kspace(rng, (1, 2, 16, 40))
    k[..., :4] = 0
    k[..., 36:] = 0  # fastMRI pads the phase-encoding band with zero columns
    path = write_fastmri(tmp_path / "p.h5", k)
    with h5py.File(path, "r+") as f:  # the header says lines 0..31 were acquired, centre 16
        del f["ismrmrd_header"]
        hdr = Header((16, 40, 1), (160.0, 400.0, 5.0), (16, 40, 1), (160.0, 400.0, 5.0), (0, 31, 16))
        f.create_dataset("ismrmrd_header", data=header_xml(hdr).encode())
    data = read_kspace(path)
    assert data.header.padding == (4, 36)
    assert data.sampling().acceleration == pytest.approx(1.0)


def test_describe_reads_one_slice_and_reports_the_file(tmp_path, rng):
    from meddl.reconstruction import describe

    mask = equispaced_mask(24, 4, 0.17, rng)
    path = write_fastmri(tmp_path / "d.h5", _kspace(rng, (5, 3, 32, 24)) * mask, mask=mask)
    info = describe(path)
    assert info["slices"] == 5 and info["coils"] == 3 and info["kspace_matrix"] == [32, 24]
    assert info["acceleration"] == pytest.approx(24 / mask.sum(), abs=1e-3)
    assert info["calibration_lines"] >= 4


# --- BART .cfl / .hdr ---------------------------------------------------------------------------


def _bart_kspace(rng, h=12, w=10, coils=3, slices=2) -> np.ndarray:
    """BART layout: READ, PHS1, PHS2 = 1, COIL, then ones up to SLICE (dimension 13)."""
    k = (rng.normal(size=(h, w, 1, coils, *[1] * 9, slices)) + 1j * rng.normal(size=(h, w, 1, coils, *[1] * 9, slices)))
    return k.astype(np.complex64)


def test_bart_cfl_reads_as_slices_coils_readout_phase(tmp_path, rng):
    from meddl.reconstruction.bart_io import load_cfl, write_cfl

    k = _bart_kspace(rng)
    hdr, cfl = write_cfl(tmp_path / "scan", k)
    assert hdr.read_text().startswith("# Dimensions\n12 10 1 3 1 1 1 1 1 1 1 1 1 2")
    assert cfl.stat().st_size == k.size * 8
    np.testing.assert_array_equal(load_cfl(cfl)[..., 0, 0], k)  # 16 dimensions: AVG and BATCH of 1
    for name in ("scan.cfl", "scan.hdr", "scan"):  # BART names data without a suffix
        data = read_kspace(tmp_path / name)
        assert data.format == "bart" and data.kspace.shape == (2, 3, 12, 10)
        for s in range(2):
            for c in range(3):
                np.testing.assert_array_equal(data.kspace[s, c], k[:, :, 0, c, ..., s].reshape(12, 10))
    assert main(["reconstruct", str(tmp_path / "scan"), "-o", str(tmp_path / "x.nii.gz"), "--method", "zero-filled",
                 "--progress", "none"]) == 0
    one = read_kspace(tmp_path / "scan.cfl", slices=(1,))
    np.testing.assert_array_equal(one.kspace[0], data.kspace[1])
    # no geometry in the format: 1 mm, and the notice says so
    assert np.allclose(np.linalg.norm(data.affine()[:3, :3], axis=0), 1.0)
    assert "1 mm pixels assumed" in data.geometry_notice()


def test_bart_phantom_zero_filled_matches_bart_rss(tmp_path):
    """BART's own phantom k-space, reconstructed by us (zero-filled RSS) and by BART (fft + rss)."""
    import shutil
    import subprocess

    if shutil.which("bart") is None:
        pytest.skip("the Debian package bart is not installed")
    from meddl.reconstruction.bart_io import load_cfl

    run = lambda *a: subprocess.run(["bart", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("phantom", "-k", "-x", "64", "-s", "4", "ph")
    run("fft", "-i", "-u", "3", "ph", "img")
    run("rss", "8", "img", "rss")
    out = tmp_path / "zf.nii.gz"
    assert main(["reconstruct", str(tmp_path / "ph.cfl"), "-o", str(out), "--method", "zero-filled",
                 "--progress", "none"]) == 0
    from meddl import io

    ours = io.read(out).numpy()[0, :, :, 0]
    bart = np.abs(np.asarray(load_cfl(tmp_path / "rss")))[:, :, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(ours, bart, rtol=1e-4, atol=1e-4 * bart.max())


@pytest.mark.parametrize("case, message", [
    ("truncated", r"expected 5760 bytes for dimensions \[12, 10, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2\], got 5000: "
                  r"a truncated"),
    ("no-cfl", r"no such file \(BART data is a \.hdr and a \.cfl side by side\)"),
    ("bad-header", r"expected a BART header \('# Dimensions'"),
    ("3d", r"3D k-space \(4 partitions along PHS2\); meddl reconstructs 2D slices"),
    ("echoes", r"got also TE = 2; pick one with bart slice"),
    ("slices", r"--slices: expected indices in 0\.\.1"),
])
def test_bad_bart_data_gives_one_error_line_and_exit_2(case, message, tmp_path, rng, capsys):
    from meddl.reconstruction.bart_io import write_cfl

    k = _bart_kspace(rng)
    if case == "3d":
        k = np.repeat(k, 4, axis=2)
    if case == "echoes":
        k = np.repeat(k, 2, axis=5)
    hdr, cfl = write_cfl(tmp_path / "scan", k)
    if case == "truncated":
        cfl.write_bytes(cfl.read_bytes()[:5000])
    if case == "no-cfl":
        cfl.unlink()
        target = hdr
    else:
        target = cfl
    if case == "bad-header":
        hdr.write_text("# Dimensions\n12 ten 1\n")
    extra = ["--slices", "5"] if case == "slices" else []
    out = tmp_path / "out.nii.gz"
    assert main(["reconstruct", str(target), "-o", str(out), "--method", "zero-filled", "--progress", "none",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()


def test_meddl_info_describes_a_kspace_file(tmp_path, rng, capsys):
    import json

    from meddl.reconstruction.bart_io import write_cfl

    k = _kspace(rng)
    fastmri = write_fastmri(tmp_path / "raw.h5", k)
    assert main(["info", str(fastmri), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["format"] == "fastmri" and facts["coils"] == k.shape[1] and facts["kspace_matrix"] == list(k.shape[2:])
    write_cfl(tmp_path / "scan", np.transpose(k[0], (1, 2, 0))[:, :, None, :])
    assert main(["info", str(tmp_path / "scan.cfl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("raw k-space (bart): reconstruct it with meddl reconstruct") and "  coils: " in out
    with h5py.File(tmp_path / "other.h5", "w") as f:  # HDF5 but not k-space (an ITK transform, say)
        f.create_dataset("TransformGroup", data=np.zeros(3))
    assert main(["info", str(tmp_path / "other.h5")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read")


def test_bart_names_never_match_folders_and_absurd_headers_are_refused(tmp_path, capsys, monkeypatch):
    from meddl.reconstruction.bart_io import cfl_pair

    assert cfl_pair(".") is None and cfl_pair("/") is None and cfl_pair(tmp_path) is None
    monkeypatch.chdir(tmp_path)
    assert main(["info", "."]) == 2
    assert main(["reconstruct", ".", "-o", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[0] for ln in err] == ["error", "error"], err
    (tmp_path / "huge.hdr").write_text("# Dimensions\n4294967296 4294967296 1 1\n")
    (tmp_path / "huge.cfl").write_bytes(b"")
    assert main(["reconstruct", str(tmp_path / "huge"), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert re.search(r"expected 147573952589676412928 bytes .* got 0: a truncated", capsys.readouterr().err)


def test_ismrmrd_file_with_a_scalar_header_and_no_data_is_one_error(tmp_path, capsys):
    pytest.importorskip("ismrmrd")
    from meddl.cli import main

    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.create_group("dataset").create_dataset("xml", data=b"<ismrmrdHeader/>")
    with pytest.raises(InputError, match=r"the ISMRMRD XML header in 'dataset/xml' is not stored as ISMRMRD writes"):
        read_kspace(path)
    for argv in (["reconstruct", str(path), "-o", str(tmp_path / "r.nii.gz"), "--method", "zero-filled"],
                 ["info", str(path)]):
        assert main([*argv, "--progress", "none"] if argv[0] == "reconstruct" else argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "internal" not in err, err
