"""Inputs found by a review of the command line against the bad-input rules (one test per finding).

Each case used to end in a traceback ("internal error"), a hang, or a silently wrong file.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from meddl import io
from meddl.cli import main
from meddl.errors import InputError
from meddl.reconstruction.masks import poisson_mask
from meddl.volume import Volume, affine_from_geometry


def _cube(shape=(24, 24, 24), shift=0, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros(shape, np.float32)
    a[6:18, 6:18, 6:18] = 1
    a = np.roll(a, shift, 0) + 0.1 * rng.random(shape, dtype=np.float32)
    return Volume(a[None], affine_from_geometry([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]))


@pytest.mark.parametrize("suffix, data_name", [(".nhdr", "v.raw.gz"), (".mhd", "v.zraw")])
def test_detached_header_names_its_final_data_file(tmp_path, suffix, data_name):
    vol = _cube((6, 5, 4))
    out = io.write(vol, tmp_path / f"v{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, data_name])  # nothing hidden left
    assert data_name in out.read_text(errors="ignore")
    np.testing.assert_array_equal(io.read(out).numpy(), vol.numpy())


def test_written_files_follow_the_umask_and_upper_case_suffixes_work(tmp_path):
    old = os.umask(0o022)
    try:
        out = io.write(_cube((6, 5, 4)), tmp_path / "V.NII.GZ")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["V.NII.GZ"]
    assert io.read(out).spatial_shape == (6, 5, 4)


def test_info_json_of_an_all_nan_image_is_valid_json(tmp_path, capsys):
    path = tmp_path / "nan.nii.gz"
    io.write(_cube((4, 4, 4)).with_data(np.full((1, 4, 4, 4), np.nan, np.float32)), path)
    assert main(["info", "--json", str(path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["min"] is None and facts["max"] is None and facts["nonfinite_voxels"] == 64


def test_absurd_spacing_in_a_header_is_refused(tmp_path, capsys):
    image = sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32))
    image.SetSpacing((1e30, 1.0, 1.0))
    path = tmp_path / "huge.nii.gz"
    sitk.WriteImage(image, str(path))
    assert main(["info", str(path)]) == 2
    assert "expected voxel spacing up to" in capsys.readouterr().err


def test_negative_seed_is_a_usage_error(tmp_path, capsys):
    assert main(["register", "f.nii.gz", "m.nii.gz", "-o", str(tmp_path / "r.nii.gz"), "--seed", "-1"]) == 2
    assert "--seed: expected 0 to 4294967295, got -1" in capsys.readouterr().err


def test_poisson_masks_full_sampling_impossible_centres_and_small_grids():
    assert poisson_mask((32, 64), 1.0).all()
    with pytest.raises(InputError, match="calibration centre alone holds"):
        poisson_mask((32, 64), 16.0, calib=24)
    mask = poisson_mask((32, 64), 16.0, calib=4, rng=np.random.default_rng(0))  # used to search for minutes
    assert mask[14:18, 30:34].all() and 4 < mask.size / mask.sum() < 40


def test_kspace_group_instead_of_dataset(tmp_path, capsys):
    path = tmp_path / "group.h5"
    with h5py.File(path, "w") as f:
        f.create_group("kspace")
    assert main(["reconstruct", str(path), "-o", str(tmp_path / "x.nii.gz"), "--method", "zero-filled"]) == 2
    assert "expected 'kspace' to be a dataset" in capsys.readouterr().err


def test_registration_of_small_and_thin_images(tmp_path, capsys):
    from meddl.registration import RegistrationConfig, register

    fixed, moving = _cube(), _cube(shift=2)
    result = register(fixed, moving)  # default network+optimisation: the 24 mm box is too small for the network
    assert result.summary["method"] == "optimisation"
    assert any("needs at least" in n for n in result.summary["notes"])
    with pytest.raises(InputError, match="needs at least .* use --method optimisation"):
        register(fixed, moving, RegistrationConfig(method="network"))
    with pytest.raises(InputError, match="--levels: expected working-grid spacings below half"):
        register(fixed, moving, RegistrationConfig(method="optimisation", levels_mm=(1e9,)))
    # 8 voxels deep: the affine pre-alignment used to fail inside ITK's smoothing
    thin = Volume(_cube((24, 24, 8)).numpy(), fixed.affine)
    out = register(fixed, thin, RegistrationConfig(method="optimisation", iterations=2, inverse=False))
    assert out.summary["folding_percent"] == 0.0


def test_small_messages_say_what_is_wrong(tmp_path, capsys):
    folder = tmp_path / "scan.h5"
    folder.mkdir()
    assert main(["reconstruct", str(folder), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "a folder, not a file" in capsys.readouterr().err
    rgba = Volume(np.full((4, 8, 8), 200, np.uint8), affine_from_geometry([1.0, 1.0], [0.0, 0.0]))
    with pytest.raises(InputError, match="JPEG holds grey or RGB images, got 4 channels"):
        io.write(rgba, tmp_path / "x.jpg")
    assert not list(tmp_path.glob("*.jpg"))
    from meddl.adaptation.stain import StainNormalizer

    tiny = Volume(np.array([[[150, 90]], [[60, 40]], [[160, 120]]], np.uint8), affine_from_geometry([1.0, 1.0], [0.0, 0.0]))
    with pytest.raises(InputError, match="expected at least .* tissue pixels to estimate stains from, got 2"):
        StainNormalizer().fit(tiny)
