import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from featkd.checkpoint import (
    CheckpointError,
    load_model_weights,
    load_tensors,
    read_weights,
    save_tensors,
)
from featkd.models import create_model


def test_round_trip_nested(tmp_path):
    obj = {"w": torch.arange(3.0), "state": {"step": 4, "lr": [0.1, 0.2]}, "name": "x"}
    save_tensors(tmp_path / "a" / "c.pt", obj)
    back = load_tensors(tmp_path / "a" / "c.pt")
    torch.testing.assert_close(back["w"], obj["w"])
    assert back["state"] == {"step": 4, "lr": [0.1, 0.2]} and back["name"] == "x"
    assert os.listdir(tmp_path / "a") == ["c.pt"]  # no temporary left behind


def test_saved_files_get_the_mode_of_any_new_file(tmp_path):
    """Atomic writes go through mkstemp (owner-only); model.pt must be as readable as results.json."""
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "c.pt", {"w": torch.ones(1)})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644


def test_rejects_objects_and_keeps_old_file(tmp_path):
    path = tmp_path / "c.pt"
    save_tensors(path, {"w": torch.ones(1)})
    with pytest.raises(TypeError, match="tensors only"):
        save_tensors(path, {"w": nn.Linear(1, 1)})
    torch.testing.assert_close(load_tensors(path)["w"], torch.ones(1))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_a_full_disk_is_an_os_error_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    import io

    import featkd.checkpoint as checkpoint

    path = tmp_path / "c.pt"
    save_tensors(path, {"w": torch.ones(1)})
    real_fdopen = os.fdopen

    class Full(io.RawIOBase):  # the disk fills after the first kilobyte
        def __init__(self, fd, mode):
            self.file, self.written = real_fdopen(fd, mode), 0

        def writable(self):
            return True

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def close(self):
            self.file.close()
            super().close()

    monkeypatch.setattr(checkpoint.os, "fdopen", Full)
    with pytest.raises(OSError, match=r"cannot write .*c\.pt: No space left on device") as caught:
        save_tensors(path, {"w": torch.zeros(1000)})
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    torch.testing.assert_close(load_tensors(path)["w"], torch.ones(1))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_load_model_weights_from_run_dir(tmp_path):
    src, dst = nn.Linear(2, 3), nn.Linear(2, 3)
    save_tensors(tmp_path / "model.pt", src.state_dict())
    load_model_weights(dst, tmp_path)
    torch.testing.assert_close(dst.weight, src.weight)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_weights(nn.Linear(2, 4), tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_weights(dst, tmp_path / "missing")


# --------------------------------------------------------------------------- formats
def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet9", 3, in_channels=1, image_size=8, width=1 / 16)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)


def write_state_dict(path, state):
    torch.save(state, path)


def write_legacy(path, state):
    torch.save(state, path, _use_new_zipfile_serialization=False)


def write_safetensors(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def write_lightning(path, state):
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state.items()} | {"criterion.weight": torch.ones(3)},
                "hyper_parameters": {"lr": 0.1, "width": "1/16"},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}]}, path)


def write_ddp(path, state):
    torch.save({f"module.{k}": v for k, v in state.items()}, path)


def write_compiled_ddp(path, state):
    torch.save({"model_state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, path)


def write_featkd_checkpoint(path, state):
    save_tensors(path, {**{f"model.model.{k}": v for k, v in state.items()}, "rng.cpu": torch.get_rng_state(),
                        "meta": torch.zeros(4, dtype=torch.uint8)})


@pytest.mark.parametrize("writer, name", [
    (write_state_dict, "w.pt"), (write_state_dict, "w.pth"), (write_legacy, "w.pt"),
    (write_safetensors, "w.safetensors"), (write_lightning, "last.ckpt"), (write_ddp, "ddp.pt"),
    (write_compiled_ddp, "ddp_compiled.pth"), (write_featkd_checkpoint, "checkpoint.pt"),
])
def test_every_format_loads_the_same_weights(tmp_path, writer, name):
    source, target = tiny(0), tiny(1)
    writer(tmp_path / name, source.state_dict())
    load_model_weights(target, tmp_path / name)
    assert_same_weights(target, source)


def test_read_once_load_many(tmp_path):
    source = tiny(0)
    write_ddp(tmp_path / "w.pt", source.state_dict())
    weights = read_weights(tmp_path / "w.pt")
    for seed in (1, 2):
        target = tiny(seed)
        load_model_weights(target, weights)
        assert_same_weights(target, source)


# --------------------------------------------------------------------------- bad files
class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_files(folder):
    """File name -> (writer, expected message)."""
    good = folder / "good.pt"
    torch.save(tiny().state_dict(), good)
    data = good.read_bytes()
    cases = {
        "empty.pt": (lambda p: p.write_bytes(b""), "is empty"),
        "truncated.pt": (lambda p: p.write_bytes(data[: len(data) // 2]), "not a readable torch file"),
        "corrupt.pt": (lambda p: p.write_bytes(bytes(range(256)) * 3), "not a readable torch file"),
        "text.pth": (lambda p: p.write_text("hello\n"), "not a readable torch file"),
        "full_model.pt": (lambda p: torch.save(tiny(), p), "pickled Python objects (torch.nn.modules"),
        "runs_code.pt": (lambda p: torch.save({"w": RunsCode()}, p), "pickled Python objects (posix.system)"),
        "runs_code_raw.pkl": (lambda p: p.write_bytes(pickle.dumps(RunsCode())), "not a readable torch file"),
        "tensor.pt": (lambda p: torch.save(torch.ones(3), p), "holds a Tensor, not a dict"),
        "no_tensors.pt": (lambda p: torch.save({"epoch": 3}, p), "holds no tensors"),
        "empty.safetensors": (lambda p: p.write_bytes(b""), "is empty"),
        "truncated.safetensors": (lambda p: save_file({"w": torch.ones(64)}, str(p))
                                  or p.write_bytes(p.read_bytes()[:-16]), "not a readable safetensors file"),
        "corrupt.safetensors": (lambda p: p.write_bytes(b"\xff" * 64), "not a readable safetensors file"),
    }
    return cases


BAD_FILES = ["empty.pt", "truncated.pt", "corrupt.pt", "text.pth", "full_model.pt", "runs_code.pt",
             "runs_code_raw.pkl", "tensor.pt", "no_tensors.pt", "empty.safetensors", "truncated.safetensors",
             "corrupt.safetensors"]


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_give_one_line_naming_the_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    writer, message = bad_files(tmp_path)[name]
    path = tmp_path / name
    writer(path)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(tiny(), path, "resnet9")
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text, text
    assert "weights_only" not in text  # torch's advice to unpickle is not passed on
    assert not (tmp_path / "pwned").exists()


def test_wrong_architecture_is_summarised(tmp_path):
    torch.save(create_model("resnet18", 3, in_channels=1, image_size=8, width=1 / 16).state_dict(),
               tmp_path / "r18.pt")
    with pytest.raises(CheckpointError) as info:
        load_model_weights(tiny(), tmp_path / "r18.pt", "resnet9")
    text = str(info.value)
    assert "does not fit resnet9:" in text and "Sequential" not in text and len(text) < 600, text
    assert "unexpected (e.g. " in text and ", ...)" in text and "wrong model name, width" in text
    wider = create_model("resnet9", 3, in_channels=1, image_size=8, width=1 / 8)
    torch.save(wider.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"61 of another shape \(file vs model\) \(e\.g\. stem\.conv\.weight "
                                              r"\(8, 1, 3, 3\) vs \(4, 1, 3, 3\)"):
        load_model_weights(tiny(), tmp_path / "wide.pt", "resnet9")
    model = tiny()
    del_key = next(iter(model.state_dict()))
    torch.save({k: v for k, v in model.state_dict().items() if k != del_key}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match=rf"1 of the model's \d+ tensors missing \(e\.g\. {del_key}\)"):
        load_model_weights(tiny(), tmp_path / "short.pt")


def test_run_directory_with_several_runs_names_them(tmp_path):
    for seed in (0, 1):
        save_tensors(tmp_path / f"run-{seed}" / "model.pt", tiny().state_dict())
    with pytest.raises(CheckpointError, match="holds 2 runs; pass one of them"):
        read_weights(tmp_path)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.pt"):
        read_weights(tmp_path / "empty_run")


def test_text_files_are_synced_before_they_replace_the_old_one(tmp_path, monkeypatch):
    import featkd.train as train

    synced = []
    real_fsync = train.os.fsync

    def fsync(fd):
        synced.append(fd)
        real_fsync(fd)

    path = tmp_path / "run.json"
    path.write_text("old")
    monkeypatch.setattr(train.os, "fsync", fsync)
    train.write_json(path, {"epoch": 1})
    assert synced and json.loads(path.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left
