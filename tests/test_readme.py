"""The README's Python API example runs as written, on a small CIFAR-100 the test writes.

Only sizes change: the epochs, the number of runs and the validation split (the
tiny dataset holds 3 training images a class); every call, name and argument is the README's.
"""

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = {"val_size=5000": "val_size=100", "epochs=50": "epochs=1", "epochs=200": "epochs=1", "runs=3": "runs=2"}


def api_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "featkd.distill(" in b and "load_splits" in b)
    for old, new in SIZES.items():
        assert old in block, f"the README example no longer says {old}: update SIZES"
        block = block.replace(old, new)
    return block


def write_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", 3), ("test", 1)):
        labels = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)


@pytest.mark.filterwarnings("ignore")
def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    import featkd
    from featkd.data import load_splits
    from featkd.models import create_model

    monkeypatch.chdir(tmp_path)
    write_cifar100(tmp_path / "data")
    splits = load_splits("cifar100", root="data/", val_size=100)
    featkd.train_teacher(create_model("resnet34", num_classes=100), splits.train, splits.test,  # its comment
                         val_set=splits.val, model_name="resnet34", epochs=1, out="runs/teacher")
    namespace: dict = {}
    exec(compile(api_example(), str(README), "exec"), namespace)
    assert len(namespace["layers"]) == 4 and len(namespace["spread"]) == 4
    assert len(namespace["result"].runs) == 2 and (tmp_path / "runs/featkd/run-1/model.pt").is_file()
    assert namespace["model"](splits.test.images[:2].float()).shape == (2, 100)
