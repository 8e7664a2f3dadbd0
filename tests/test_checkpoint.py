import os

import pytest
import torch
from torch import nn

from featkd.checkpoint import load_model_weights, load_tensors, save_tensors


def test_round_trip_nested(tmp_path):
    obj = {"w": torch.arange(3.0), "state": {"step": 4, "lr": [0.1, 0.2]}, "name": "x"}
    save_tensors(tmp_path / "a" / "c.pt", obj)
    back = load_tensors(tmp_path / "a" / "c.pt")
    torch.testing.assert_close(back["w"], obj["w"])
    assert back["state"] == {"step": 4, "lr": [0.1, 0.2]} and back["name"] == "x"
    assert os.listdir(tmp_path / "a") == ["c.pt"]  # no temporary left behind


def test_rejects_objects_and_keeps_old_file(tmp_path):
    path = tmp_path / "c.pt"
    save_tensors(path, {"w": torch.ones(1)})
    with pytest.raises(TypeError, match="tensors only"):
        save_tensors(path, {"w": nn.Linear(1, 1)})
    torch.testing.assert_close(load_tensors(path)["w"], torch.ones(1))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"m": nn.Linear(1, 1)}, path)
    with pytest.raises(Exception):
        load_tensors(path)


def test_load_model_weights_from_run_dir(tmp_path):
    src, dst = nn.Linear(2, 3), nn.Linear(2, 3)
    save_tensors(tmp_path / "model.pt", src.state_dict())
    load_model_weights(dst, tmp_path)
    torch.testing.assert_close(dst.weight, src.weight)
    with pytest.raises(ValueError, match="does not fit"):
        load_model_weights(nn.Linear(2, 4), tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_weights(dst, tmp_path / "missing")
