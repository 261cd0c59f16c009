"""Offline sample data: right kinds, geometry and orientation, built from an allowlist only."""

from __future__ import annotations

import numpy as np
import pytest
from meddl import data
from meddl.errors import InputError
from meddl.volume import Kind


def test_mni152_geometry_is_nilearns():
    datasets = pytest.importorskip("nilearn.datasets")
    img = datasets.load_mni152_template(resolution=2)
    vol = data.load_sample("mni152_t1")
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-5)
    np.testing.assert_allclose(vol.data[0], np.asarray(img.dataobj), rtol=1e-6)
    assert vol.orientation == "RAS"


def test_masks_are_binary_label_volumes_on_the_template_grid():
    t1 = data.load_sample("mni152_t1")
    for name in ("mni152_brain_mask", "mni152_gm_mask", "mni152_wm_mask"):
        mask = data.load_sample(name)
        assert mask.kind is Kind.LABEL and mask.same_grid(t1)
        assert set(np.unique(mask.data)) == {0, 1}


def test_ihc_slide_is_rgb_with_columns_on_i():
    skdata = pytest.importorskip("skimage.data")
    vol = data.load_sample("ihc_rgb")
    rgb = skdata.immunohistochemistry()
    assert vol.channels == 3 and vol.ndim == 2 and vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, np.transpose(rgb, (2, 1, 0)))


def test_dipy_slice_has_picture_layout():
    vol = data.load_sample("dipy_t1_slice")
    assert vol.ndim == 2 and vol.spatial_shape == (256, 256)
    # brain above the neck: the superior (first) rows of the picture hold more tissue than the last ones
    rows = vol.data[0].T
    assert rows[:128].sum() > rows[128:].sum()


def test_unknown_sample_is_a_clear_error():
    with pytest.raises(InputError, match=r"sample 'nope': unknown; expected one of mni152_t1"):
        data.sample_path("nope")


def test_debian_samples_report_how_to_install_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "MRICRON", tmp_path)
    monkeypatch.setenv("MEDDL_CACHE_DIR", str(tmp_path / "cache"))
    assert "colin27_t1" not in data.available_samples()
    with pytest.raises(InputError, match=r"install the Debian package 'mricron-data'"):
        data.load_sample("colin27_t1")


@pytest.mark.parametrize("name", [n for n in ("colin27_t1", "aal", "itk_brain_pd_slice") if n in data.available_samples()])
def test_debian_samples_load(name):
    vol = data.load_sample(name)
    assert vol.kind is data.SAMPLES[name].kind and vol.channels == 1


def test_sample_files_come_from_the_allowlist_only():
    """Every Debian-backed sample names one explicit file; nothing is found by scanning a folder."""
    for name, sample in data.SAMPLES.items():
        if sample.source in ("mricron-data", "insighttoolkit4-examples"):
            assert data._DEBIAN_FILES[name].endswith((".nii.gz", ".png"))
    assert len(data._DEBIAN_FILES) == len([s for s in data.SAMPLES.values()
                                           if s.source in ("mricron-data", "insighttoolkit4-examples")])
