"""The top-level package: its sub-packages are reachable as attributes, imported on first use.

Checked in a fresh interpreter: in the test process other modules have imported them already.
"""

import subprocess
import sys

import pytest

import featkd


def run_fresh(code: str) -> None:
    subprocess.run([sys.executable, "-c", "import sys, featkd\n" + code], check=True)


def test_import_stays_light_and_sub_packages_resolve_on_first_use() -> None:
    run_fresh("heavy = ['featkd.models', 'featkd.data', 'featkd.cli', 'featkd.distillation', 'featkd.layers',\n"
              "         'featkd.report']\n"
              "assert not [m for m in heavy if m in sys.modules], sorted(sys.modules)\n"
              "for name in ['layers', 'models', 'data', 'distillation', 'report', 'stats', 'cli']:\n"
              "    assert name in dir(featkd)\n"
              "    assert getattr(featkd, name).__name__ == 'featkd.' + name\n"
              "assert callable(featkd.layers.register_block) and callable(featkd.layers.generalized_layers)\n"
              "assert callable(featkd.api.load_trained_model)\n")


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        featkd.nope  # noqa: B018
