"""The top-level package: its sub-packages are reachable as attributes, imported on first use."""

import subprocess
import sys

import pytest

import featkd


@pytest.mark.parametrize("name", ["layers", "models", "data", "distillation", "report", "cli"])
def test_submodule_reachable_as_attribute(name: str) -> None:
    module = getattr(featkd, name)
    assert module.__name__ == f"featkd.{name}"
    assert name in dir(featkd)


def test_documented_references_resolve() -> None:
    assert callable(featkd.layers.register_block)
    assert callable(featkd.layers.generalized_layers)
    assert callable(featkd.api.load_trained_model)


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        featkd.nope  # noqa: B018


def test_import_stays_light() -> None:
    """``import featkd`` does not import the zoo, the data loaders or the CLI until they are used,
    and in a fresh interpreter (where no other test imported them) they resolve on first use."""
    code = ("import sys, featkd\n"
            "heavy = ['featkd.models', 'featkd.data', 'featkd.cli', 'featkd.distillation']\n"
            "assert not [m for m in heavy if m in sys.modules], sorted(sys.modules)\n"
            "featkd.models, featkd.layers.register_block\n"
            "assert 'featkd.models' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
