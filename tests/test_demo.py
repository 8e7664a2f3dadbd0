"""``featkd demo`` at a reduced size, and the shipped YAML configs."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from featkd.cli import main
from featkd.cli.demo import QUICK, DemoPlan, paper_q_layers
from featkd.config import DistillConfig, TrainConfig
from featkd.selection import PAPER_RULE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_quick_demo_writes_a_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for method in QUICK["methods"]:
        assert f"| {method} |" in printed
        assert (out / method / "results.json").is_file()
    assert (out / "teacher" / "model.pt").is_file()
    report = (out / "report.md").read_text()
    assert "## Results" in report and "| teacher |" in report and "wall (s)" in report
    assert "Selected teacher layers" in report and "featkd/quality.png" in report
    assert "## Compared with `ce`" in report and "| kd | ce | 1 vs 1 |" in report
    assert "n/a (one seed: no variance estimate)" in report  # one seed a side settles nothing
    assert (out / "curves.png").stat().st_size > 1000 and (out / "featkd" / "quality.png").is_file()
    # the default rule's choice is printed beside the paper's Q choice
    from featkd.quality import QualityReport
    from featkd.selection import DEFAULT_RULE, PAPER_RULE, measure_variant

    saved = QualityReport.from_json(out / "featkd" / "quality.json")
    used = json.loads((out / "featkd" / "results.json").read_text())["teacher_layers"]
    assert saved.variant == measure_variant(DEFAULT_RULE) and used == saved.select(4, DEFAULT_RULE)
    paper = paper_q_layers(out / "featkd", 4, out / "teacher")  # measured again if in another variant
    line = (f"Teacher layers {used}, chosen by rule `{DEFAULT_RULE}` (the default); the paper's rule "
            f"(`{PAPER_RULE}`) picks {paper}.")
    assert line in printed and line in report
    assert f"held-out split of {QUICK['val_size']} images" in saved.settings["probe"]  # never the test split
    # a report measured in the paper variant is read, not measured again
    data = json.loads((out / "featkd" / "quality.json").read_text())
    (out / "featkd" / "quality.json").write_text(json.dumps({**data, "variant": "paper"}))
    assert paper_q_layers(out / "featkd", 4, out / "teacher") == saved.select(4, "Q")
    # measured again, it uses the subset auto measured: drawn with data_seed, not the run seed
    (out / "featkd" / "quality.json").write_text(json.dumps(data))
    config = out / "featkd" / "config.yaml"
    config.write_text(config.read_text().replace("\nseed: 0\n", "\nseed: 7\n"))
    assert "seed: 7" in config.read_text() and "data_seed: 0" in config.read_text()
    import featkd.quality

    real, seeds = featkd.quality.measure, []
    monkeypatch.setattr(featkd.quality, "measure", lambda *a, seed, **k: seeds.append(seed) or real(*a, seed=seed, **k))
    assert paper_q_layers(out / "featkd", 4, out / "teacher") == paper and seeds == [0]


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "--methods", "featkd,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) ['magic']" in capsys.readouterr().err
    bad = tmp_path / "plan.yaml"
    bad.write_text("colour: red\n")
    assert main(["demo", "--config", str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown demo setting(s) ['colour']" in capsys.readouterr().err


def test_demo_yaml_holds_the_built_in_defaults():
    values = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert DemoPlan(**values) == DemoPlan()
    assert set(QUICK) <= {f.name for f in dataclasses.fields(DemoPlan)}


@pytest.mark.parametrize("name, cls, epochs, optimizer", [
    ("distill_example.yaml", DistillConfig, 50, "adamw"),
    ("teacher_example.yaml", TrainConfig, 50, "adamw"),
    ("baseline_240e_example.yaml", DistillConfig, 240, "sgd"),
])
def test_example_configs_load_and_validate(name, cls, epochs, optimizer):
    config = cls.from_yaml(CONFIGS / name)
    config.validate()
    assert (config.epochs, config.optimizer, config.batch_size) == (epochs, optimizer, 128)
    if name == "distill_example.yaml":  # "the paper's recipe"
        assert config.select_by == PAPER_RULE and config.teacher_layers == "auto"
