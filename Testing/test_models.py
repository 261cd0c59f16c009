"""Model files: verified by sha256, unpickled safely, user path over the bundled one."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from meddl import models
from meddl.errors import ModelError
from meddl.nets import UNet

ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [4, 8]}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = UNet(**ARGS)
    card = models.save_model(net, tmp_path, "tiny", ARGS, "synthetic", "python -c 'test'", {"dice": 0.5})
    return net, card, tmp_path


def test_saved_model_loads_with_identical_outputs(saved, monkeypatch):
    net, card, folder = saved
    monkeypatch.setenv("MEDDL_MODELS_DIR", str(folder))
    loaded, loaded_card = models.load_model("tiny")
    assert loaded_card.sha256 == models.sha256_of(folder / "tiny.pt") == card.sha256
    x = torch.randn(1, 1, 16, 16)
    net.eval()
    torch.testing.assert_close(loaded(x), net(x))
    body = json.loads((folder / "tiny.json").read_text())
    assert body["architecture"] == "meddl.nets.unet:UNet" and body["arguments"] == ARGS


def test_wrong_sha256_is_refused(saved, monkeypatch):
    _, _, folder = saved
    card = json.loads((folder / "tiny.json").read_text())
    card["sha256"] = "0" * 64
    (folder / "tiny.json").write_text(json.dumps(card))
    monkeypatch.setenv("MEDDL_MODELS_DIR", str(folder))
    with pytest.raises(ModelError, match=r"sha256 mismatch"):
        models.load_model("tiny")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch exploit-ran",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Exploit()}, path, pickle_protocol=2)
    with pytest.raises(ModelError, match=r"refused; expected a plain state dict"):
        models.load_state_dict(path)
    assert not (tmp_path / "exploit-ran").exists()
    with open(path, "rb") as f:  # the payload is real: plain pickle would have run it
        assert b"system" in f.read()


def test_user_path_overrides_bundled_file(saved, tmp_path, monkeypatch):
    _, _, folder = saved
    monkeypatch.setenv("MEDDL_MODELS_DIR", str(tmp_path / "empty"))
    with pytest.raises(ModelError, match=r"weights file .* not found"):
        models.load_model("tiny")
    net, card = models.load_model("tiny", path=folder / "tiny.pt")
    assert card.name == "tiny"


def test_card_is_required_and_complete(saved, monkeypatch):
    _, _, folder = saved
    monkeypatch.setenv("MEDDL_MODELS_DIR", str(folder))
    body = json.loads((folder / "tiny.json").read_text())
    del body["command"]
    (folder / "tiny.json").write_text(json.dumps(body))
    with pytest.raises(ModelError, match=r"missing field\(s\) command"):
        models.load_model("tiny")
    (folder / "tiny.json").unlink()
    with pytest.raises(ModelError, match=r"card .* is missing"):
        models.load_model("tiny")


def test_architecture_outside_meddl_is_refused(saved, monkeypatch):
    _, _, folder = saved
    body = json.loads((folder / "tiny.json").read_text())
    body["architecture"] = "os:system"
    (folder / "tiny.json").write_text(json.dumps(body))
    monkeypatch.setenv("MEDDL_MODELS_DIR", str(folder))
    with pytest.raises(ModelError, match=r"architecture must be 'meddl"):
        models.load_model("tiny")


def test_weights_that_do_not_fit_are_reported(saved, monkeypatch):
    _, _, folder = saved
    body = json.loads((folder / "tiny.json").read_text())
    body["arguments"]["features"] = [4, 8, 16]
    (folder / "tiny.json").write_text(json.dumps(body))
    monkeypatch.setenv("MEDDL_MODELS_DIR", str(folder))
    with pytest.raises(ModelError, match=r"do not fit the architecture"):
        models.load_model("tiny")


@pytest.mark.parametrize("arguments, pattern", [
    ({**ARGS, "bogus": 1}, r"the card's arguments do not build a UNet \(.*unexpected keyword argument 'bogus'"),
    ({**ARGS, "features": "abc"}, r"the card's arguments do not build a UNet \(invalid literal"),
    ([2, 1, 2], r"the card's 'arguments' must be an object of keyword arguments, got list"),
], ids=["unknown-key", "bad-value", "list"])
def test_card_arguments_that_do_not_build_the_network_are_reported(saved, monkeypatch, arguments, pattern):
    _, _, folder = saved
    body = json.loads((folder / "tiny.json").read_text())
    body["arguments"] = arguments
    (folder / "tiny.json").write_text(json.dumps(body))
    monkeypatch.setenv("MEDDL_MODELS_DIR", str(folder))
    with pytest.raises(ModelError, match=pattern):
        models.load_model("tiny")


def test_bundled_cards_match_their_weights():
    """Every card in Resources/models describes the file beside it."""
    for card_path in sorted(models.models_dir().glob("*.json")):
        card = models.ModelCard.read(card_path)
        weights = card_path.with_suffix(".pt")
        assert weights.is_file(), f"{card_path.name}: weights missing"
        assert models.sha256_of(weights) == card.sha256, f"{card_path.name}: sha256 mismatch"


def test_plain_pickle_is_what_we_avoid():
    """Sanity check of the exploit object itself: ordinary pickle would execute it."""
    assert pickle.dumps(_Exploit(), protocol=2)


def test_weights_of_another_kind_of_network_are_refused_by_name(saved):
    _, _, folder = saved
    net, _ = models.load_model("tiny", folder / "tiny.pt", architecture="meddl.nets.unet:UNet")
    with pytest.raises(ModelError, match=r"tiny.pt: holds a 'tiny' model \(UNet\), expected InContextNet weights for 'x'"):
        models.load_model("x", folder / "tiny.pt", architecture="meddl.incontext.network:InContextNet")


def test_segment_with_the_weights_of_another_capability_is_one_error_line(tmp_path, capsys):
    from meddl import io
    from meddl.cli import main
    from meddl.volume import Kind, Volume

    img = Volume(np.random.default_rng(0).random((1, 16, 16, 8)).astype(np.float32), np.eye(4))
    lab = img.with_data((img.data > 0.5).astype(np.int16), kind=Kind.LABEL)
    lab.data[..., 1:7] = 0
    io.write(img, tmp_path / "t.nii.gz")
    io.write(lab, tmp_path / "l.nii.gz")
    varnet = models.models_dir() / "reconstruction_varnet.pt"
    code = main(["segment", str(tmp_path / "t.nii.gz"), "--annotated", str(tmp_path / "l.nii.gz"),
                 "--weights", str(varnet), "--out", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.match(r"error: model file .*reconstruction_varnet.pt: holds a 'reconstruction_varnet' model \(VarNet\), "
                    r"expected InContextNet weights", err[0])
