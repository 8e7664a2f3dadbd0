"""The layer-validity statistics and their Markdown, on small synthetic results files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import validity_report as vr  # noqa: E402

CANDIDATES = [1, 2, 3, 4, 5, 6]
TEACHERS = {"resnet34": "resnet9", "vgg19_bn": "vgg11_bn", "vit_b": "vit_et"}


def accuracy(layers, teacher):
    """The synthetic truth: layer 4 is the best single layer; a set's accuracy is its layers' mean."""
    value = {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.90, 5: 0.80, 6: 0.75}
    return float(np.mean([value[t] for t in layers])) + (0.01 if teacher == "vit_b" else 0.0)


def run_entry(layers, teacher, seed_offsets=(0.0, 0.002)):
    """The validation accuracy follows the truth; the test accuracy reverses it, so a report that
    ranked by the test split would fail every assertion below."""
    acc = accuracy(layers, teacher)
    val = {str(i): acc + off for i, off in enumerate(seed_offsets)}
    test = {seed: 1.0 - value for seed, value in val.items()}
    return {"teacher": teacher, "teacher_layers": layers, "student_layers": [4] * len(layers),
            "final_val_acc": common.mean_std(list(val.values())), "val_seeds": val,
            "final_test_acc": common.mean_std(list(test.values())), "seeds": test}


def results_file(teacher, folder, drop=(), seed_offsets=(0.0, 0.002), depth_set=(3, 4, 5, 6)):
    """A results file: Q/paper ranks layers exactly as the accuracy does, S/paper in reverse."""
    truth = {t: accuracy([t], teacher) for t in CANDIDATES}
    predictors = {"Q/paper": {str(t): truth[t] for t in CANDIDATES},
                  "S/paper": {str(t): -truth[t] for t in CANDIDATES},
                  "depth": {str(t): float(t) for t in CANDIDATES},
                  "probe": {str(t): [0.3, 0.1, 0.4, 0.2, 0.6, 0.5][t - 1] for t in CANDIDATES}}
    rule_sets = {"Q/paper": [3, 4, 5, 6], "S/paper": [1, 2, 3, 4], "depth": list(depth_set),
                 "probe": [1, 3, 5, 6], "bands:S/paper": [1, 2, 3, 5]}
    random_sets = [[1, 2, 3, 4], [1, 2, 5, 6], [2, 3, 4, 5], [1, 4, 5, 6], [2, 4, 5, 6], [1, 3, 4, 6]]
    single = {f"t{t}": run_entry([t], teacher, seed_offsets) for t in CANDIDATES}
    sets = {f"set{'-'.join(map(str, s))}": run_entry(s, teacher, seed_offsets)
            for s in random_sets + list(rule_sets.values())}
    runs = {k: v for k, v in {**single, **sets}.items() if k not in drop}
    data = {"benchmark": "layer_validity", "teacher": teacher, "pair": f"{teacher}-{TEACHERS[teacher]}",
            "student": TEACHERS[teacher], "complete": not drop, "missing": list(drop),
            "settings": {"regime": "low", "train_images": 5000, "epochs": 8, "seeds": 2, "quality_subset": 5000},
            "teacher_run": {"width": 0.125, "final_test_acc": {"mean": 0.91}},
            "candidate_layers": CANDIDATES, "predictors": predictors, "rule_sets": rule_sets,
            "random_sets": random_sets, "probe": "ridge on pooled features", "standard_set": [2, 3, 4, 5],
            "protocols": {"deepest": list(single), "matched": list(single), "sets": list(sets)}, "runs": runs}
    (folder / f"layer_validity_{teacher}.json").write_text(json.dumps(data))
    return data


@pytest.fixture
def results(tmp_path):
    for teacher in TEACHERS:
        results_file(teacher, tmp_path)
    return tmp_path


def test_vectorised_spearman_matches_the_plain_one():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, size=(5, 9)).astype(float), rng.normal(size=(5, 9))  # with ties
    got = vr.spearman_rows(x, y)
    assert got == pytest.approx([common.spearman(list(a), list(b)) for a, b in zip(x, y)])
    assert np.isnan(vr.spearman_rows(np.ones(4), np.arange(4.0)))


def test_beating_depth_is_holm_adjusted():
    table = {"a": {"p": 0.01}, "b": {"p": 0.03}, "c": {"p": 0.04}, "d": {"p": None}}
    assert vr.beating(table, lambda row: row["p"]) == ["a"]  # Holm: 3 x 0.01; then 2 x 0.03 = 0.06
    assert vr.beating({"a": {"p": 0.04}}, lambda row: row["p"]) == ["a"]
    assert vr.beating({"a": {"p": 0.04}, "b": {"p": 0.5}}, lambda row: row["p"]) == []


def test_sign_flip_p_is_exact_for_few_pairs():
    rng = np.random.default_rng(0)
    assert vr.sign_flip_p([1.0] * 6, rng) == pytest.approx(1 / 64)  # only "all +" reaches the mean
    assert vr.sign_flip_p([1.0, -1.0], rng) == pytest.approx(0.75)
    assert vr.sign_flip_p([0.0, 0.0], rng) == 1.0 and vr.sign_flip_p([], rng) is None
    many = vr.sign_flip_p([0.5] * 30, rng)  # Monte Carlo, the observed flip included
    assert 0 < many < 0.001


def test_rank_correlation_regret_and_tests_against_depth(results):
    teachers = vr.load(results)
    assert list(teachers) == ["resnet34", "vgg19_bn", "vit_b"]
    analysis = vr.analyse(teachers, n_boot=300)
    deepest = analysis["deepest"]
    q = deepest["rho"]["Q/paper"]
    assert q["teachers"]["vgg19_bn"]["rho"] == pytest.approx(1.0) and q["pooled"]["rho"] == pytest.approx(1.0)
    assert q["pooled"]["low"] == pytest.approx(1.0)  # every resample keeps the perfect ranking
    assert deepest["rho"]["S/paper"]["pooled"]["rho"] == pytest.approx(-1.0)
    depth_rho = common.spearman(CANDIDATES, [accuracy([t], "vit_b") for t in CANDIDATES])
    assert deepest["rho"]["depth"]["teachers"]["vit_b"]["rho"] == pytest.approx(depth_rho)
    assert deepest["rho"]["Q/paper"]["vs_depth"]["diff"] == pytest.approx(1.0 - depth_rho)
    assert deepest["rho"]["Q/paper"]["vs_depth"]["p"] < 0.05 and deepest["rho"]["S/paper"]["vs_depth"]["p"] > 0.5
    # regret: Q picks the best layer (4), depth the deepest (6: 15 points below), S the worst (1)
    assert deepest["regret"]["Q/paper"]["resnet34"]["regret"] == pytest.approx(0.0)
    assert deepest["regret"]["depth"]["resnet34"]["layers"] == [6]
    assert deepest["regret"]["depth"]["vit_b"]["regret"] == pytest.approx(-15.0)
    assert deepest["regret"]["S/paper"]["vgg19_bn"]["regret"] == pytest.approx(-40.0)
    assert "bands:S/paper" not in deepest["regret"]  # a set-building rule has no single layer
    # against depth's choice: +15 points on 3 teachers x 2 seeds, all positive -> p = 1/64
    vs = deepest["vs_depth"]["Q/paper"]
    assert vs["diff"] == pytest.approx(15.0) and vs["pairs"] == 6 and vs["p"] == pytest.approx(1 / 64)


def test_sets_use_random_subsets_for_rho_and_every_set_for_regret(results):
    analysis = vr.analyse(vr.load(results), n_boot=200)
    sets = analysis["sets"]
    assert sets["rho"]["Q/paper"]["teachers"]["resnet34"]["n"] == 6  # the random sets only
    assert sets["rho"]["Q/paper"]["pooled"]["rho"] == pytest.approx(1.0)  # a set's mean score
    best = max(accuracy(s, "resnet34") for s in [[3, 4, 5, 6], [1, 2, 3, 4], [1, 3, 5, 6], [1, 2, 3, 5],
                                                  [1, 2, 5, 6], [2, 3, 4, 5], [1, 4, 5, 6], [2, 4, 5, 6],
                                                  [1, 3, 4, 6]])
    regret = sets["regret"]["bands:S/paper"]["resnet34"]
    assert regret["layers"] == [1, 2, 3, 5]
    assert regret["regret"] == pytest.approx(100 * (accuracy([1, 2, 3, 5], "resnet34") - best))
    assert sets["vs_depth"]["Q/paper"]["diff"] == pytest.approx(0.0)  # the same set as depth
    standard = sets["regret"]["standard"]["vgg19_bn"]  # the baselines' layers, for reference
    assert standard["layers"] == [2, 3, 4, 5]
    assert standard["regret"] == pytest.approx(100 * (accuracy([2, 3, 4, 5], "vgg19_bn") - best))


def test_held_out_check_picks_the_winner_on_the_other_teachers(results):
    analysis = vr.analyse(vr.load(results), n_boot=100)
    rows = analysis["deepest"]["held_out"]
    assert [r["held_out"] for r in rows] == ["resnet34", "vgg19_bn", "vit_b"]
    for row in rows:
        assert row["winner"] == "Q/paper" and row["chosen_on"] == [t for t in TEACHERS if t != row["held_out"]]
        assert row["winner_regret"] == pytest.approx(0.0) and row["depth_regret"] == pytest.approx(-15.0)


def test_held_out_check_leaves_out_the_fixed_standard_set():
    """The baselines' standard layers are not a rule a new teacher could be given."""
    choices = {t: {"Q/paper": {"regret": -0.5}, "depth": {"regret": -1.0}, vr.STANDARD: {"regret": 0.0}}
               for t in TEACHERS}
    rows = vr.held_out(choices, ["Q/paper", "depth", vr.STANDARD])
    assert [r["winner"] for r in rows] == ["Q/paper"] * 3


def test_markdown_renders_every_part_and_marks_partial_results(tmp_path):
    results_file("resnet34", tmp_path)
    results_file("vgg19_bn", tmp_path)
    results_file("vit_b", tmp_path, drop=("t4", "set3-4-5-6"))
    text = vr.markdown(tmp_path, n_boot=100)
    assert text.startswith("## Which rule picks the teacher layers? (`benchmarks/layer_validity.py`)")
    for title in vr.PROTOCOL_TITLES.values():
        assert f"### {title}" in text
    assert "| Q/paper | +1.00 [+1.00, +1.00] | +1.00 [+1.00, +1.00] |" in text
    assert "| depth | -15.00 (GL 6) | -15.00 (GL 6) |" in text
    assert "**partial**: 13 of 15 configurations" in text
    assert "Beat depth (Holm-adjusted p < 0.05 over the rules above): in ranking — Q/paper" in text
    assert "| sets | vit_b | Q/paper (+0.00 on resnet34, vgg19_bn) | — |" in text  # its set not finished there
    assert "### Held-out check" in text and "| deepest | resnet34 | Q/paper (+0.00 on vgg19_bn, vit_b) |" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No results yet: run `python benchmarks/layer_validity.py`" in vr.markdown(empty)


def test_default_verdict_needs_three_teachers_and_a_significant_win_over_depth(tmp_path, monkeypatch):
    from featkd import selection

    monkeypatch.setattr(selection, "DEFAULT_RULE", "depth")  # the report names featkd's default
    for teacher in ("resnet34", "vgg19_bn"):
        results_file(teacher, tmp_path)
    results_file("vit_b", tmp_path, drop=("t4",))
    teachers = vr.load(tmp_path)
    verdict = vr.default_verdict(teachers, vr.analyse(teachers, n_boot=50))
    assert verdict["rule"] is None and verdict["complete"] == ["resnet34", "vgg19_bn"]
    text, line = vr.report(tmp_path, n_boot=50)
    assert "**Undecided**: 2 of 3 teachers complete (resnet34, vgg19_bn)" in text
    assert line == ("Default teacher-layer rule: **undecided** (2 of 3 layer-validity teachers complete); "
                    "`auto` uses `depth` until then.")

    # three complete teachers, 2 seeds: Q's set is depth's; nothing can win (4 rules / 2^6 pairs > 0.05)
    results_file("vit_b", tmp_path)
    teachers = vr.load(tmp_path)
    verdict = vr.default_verdict(teachers, vr.analyse(teachers, n_boot=50))
    assert verdict["rule"] == "depth" and verdict["beat_depth"] == []
    assert verdict["floor"] == pytest.approx(4 / 64)
    text = vr.markdown(tmp_path, n_boot=50)
    assert "smallest Holm-adjusted p attainable is 0.0625: no rule can beat depth" in text
    assert "Verdict: **depth** (rules beating depth: none); featkd's `DEFAULT_RULE` (`depth`) matches it." in text

    # 3 seeds and a poor depth set [1, 2, 5, 6] (0.6625): the sets of Q (0.7875), S (0.675) and probe
    # (0.6875) beat it in all 9 pairs (p = 1/512, Holm at most 4/512), bands:S (0.65) does not; Q has
    # the best regret and wins
    for teacher in TEACHERS:
        results_file(teacher, tmp_path, seed_offsets=(0.0, 0.002, 0.004), depth_set=(1, 2, 5, 6))
    teachers = vr.load(tmp_path)
    verdict = vr.default_verdict(teachers, vr.analyse(teachers, n_boot=50))
    assert verdict["beat_depth"] == ["Q/paper", "S/paper", "probe"] and verdict["rule"] == "Q/paper"
    text, line = vr.report(tmp_path, n_boot=50)
    assert "Verdict: **Q/paper** (rules beating depth: Q/paper, S/paper, probe)" in text
    sets = text[text.index(f"### {vr.PROTOCOL_TITLES['sets']}"):]
    q_row = next(row for row in sets.splitlines() if row.startswith("| Q/paper |") and "pairs)" in row)
    assert q_row.endswith("(p **0.002**, Holm **0.008**, 9 pairs) |")  # 1/512, times the 4 rules at most
    assert line.startswith("Default teacher-layer rule: **Q/paper** by the criterion fixed in advance (rules "
                           "beating depth: Q/paper, S/paper, probe); `auto` uses `depth`. Held-out check")
    assert line.endswith("better on 3 of 3 teachers (resnet34 Q/paper +12.50, vgg19_bn Q/paper +12.50, "
                         "vit_b Q/paper +12.50 points).")
    assert "(`depth`) **does not match** it." in text
    monkeypatch.setattr(selection, "DEFAULT_RULE", "Q")  # Q in the variant measured by default: paper
    assert "featkd's `DEFAULT_RULE` (`Q`) matches it." in vr.markdown(tmp_path, n_boot=50)
