"""Selection rules (featkd.selection), the linear probe, and the rules applied to a QualityReport."""

import json
import math

import pytest
import torch

from featkd import selection
from featkd.quality import (
    LayerQuality,
    QualityReport,
    pool_features,
    probe_accuracy,
    probe_halves,
)
from featkd.selection import Rule, band_edges, bands, parse_rule, top_k

NAN = float("nan")


# ------------------------------------------------------------------ set builders
def test_top_k_takes_the_highest_scores_in_depth_order():
    assert top_k([1, 2, 3, 4, 5], [0.1, 0.9, 0.3, 0.8, 0.2], 2) == [2, 4]
    assert top_k([5, 3, 9], [0.2, 0.7, 0.5], 2) == [3, 9]  # unsorted input, sorted output


def test_top_k_breaks_ties_deeper_and_ranks_nan_last():
    assert top_k([1, 2, 3, 4], [0.5, 0.5, 0.5, 0.1], 2) == [2, 3]
    assert top_k([1, 2, 3], [NAN, 0.0, -1.0], 2) == [2, 3]
    assert top_k([1, 2, 3], [NAN, NAN, -1.0], 2) == [2, 3]  # NaNs tie: the deeper one
    assert top_k([1, 2], [-math.inf, NAN], 1) == [1]  # NaN below even -inf
    assert bands([1, 2], [-math.inf, NAN], 1) == [1]


def test_band_edges_cover_every_layer_once():
    assert band_edges(17, 4) == [(0, 4), (4, 8), (8, 12), (12, 17)]
    assert band_edges(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert band_edges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="between 1 and 3"):
        band_edges(3, 4)


def test_bands_takes_the_best_layer_of_each_depth_band():
    layers = list(range(1, 13))  # bands 1-3, 4-6, 7-9, 10-12
    scores = [0.1, 0.9, 0.2, 0.3, 0.3, 0.1, 0.8, 0.95, 0.9, 0.05, 0.01, 0.02]
    assert bands(layers, scores, 4) == [2, 5, 8, 10]  # band 2 ties: the deeper (5)
    assert top_k(layers, scores, 4) == [2, 7, 8, 9]  # the same scores, a different question
    assert bands(layers, scores, 1) == [8]  # one band: the single best layer
    shuffled = [layers[i] for i in (11, 0, 5, 3, 2, 7, 1, 9, 4, 10, 6, 8)]
    by_layer = dict(zip(layers, scores))
    assert bands(shuffled, [by_layer[t] for t in shuffled], 4) == [2, 5, 8, 10]


def test_builders_check_their_input():
    with pytest.raises(ValueError, match="between 1 and 3"):
        top_k([1, 2, 3], [0.0, 1.0, 2.0], 4)
    with pytest.raises(ValueError, match="3 layers but 2 scores"):
        bands([1, 2, 3], [0.0, 1.0], 1)
    with pytest.raises(ValueError, match="distinct"):
        top_k([1, 1, 2], [0.0, 1.0, 2.0], 1)


# ------------------------------------------------------------------ rule names
def test_parse_rule_reads_every_name_and_rejects_others():
    assert parse_rule("S") == Rule("S") and parse_rule(" bands:probe ") == Rule("probe", "bands")
    assert parse_rule(Rule("Q")) == Rule("Q")
    names = selection.rule_names()
    assert {"Q", "S", "I", "E", "sqrtIE", "depth", "probe", "bands:S", "bands:depth"} <= set(names)
    assert all(parse_rule(name).name == name for name in names)
    for bad in ("q", "bands:", "top:S", "stages:S", "bands:bands:S", ""):
        with pytest.raises(ValueError, match="valid: Q, S, I, E, sqrtIE, depth, probe, bands:Q"):
            parse_rule(bad)
    assert parse_rule(selection.DEFAULT_RULE).name == selection.DEFAULT_RULE
    assert parse_rule(selection.PAPER_RULE) == Rule("Q", "top", "paper")


def test_rules_may_name_their_quality_variant():
    assert parse_rule("bands:Q/corrected") == Rule("Q", "bands", "corrected")
    assert parse_rule("Q/paper").name == "Q/paper" and parse_rule("sqrtIE/corrected").variant == "corrected"
    for bad, message in (("Q/exact", "unknown knowledge-quality variant 'exact'"),
                         ("depth/paper", "depth does not depend on the knowledge-quality variant"),
                         ("bands:probe/corrected", "probe does not depend"), ("Q/", "unknown knowledge-quality")):
        with pytest.raises(ValueError, match=message):
            parse_rule(bad)
    assert Rule("Q", "bands").in_variant("corrected") == Rule("Q", "bands", "corrected")
    assert Rule("Q", variant="paper").in_variant("corrected") == Rule("Q", variant="paper")  # its own stays
    assert Rule("depth").in_variant("corrected") == Rule("depth")  # needs none


def test_resolve_rule_puts_the_default_rule_in_a_given_variant(monkeypatch):
    assert selection.resolve_rule("S/corrected", "paper") == Rule("S", variant="corrected")  # a given rule as is
    monkeypatch.setattr(selection, "DEFAULT_RULE", "bands:Q/corrected")
    assert selection.resolve_rule(None) == selection.resolve_rule(None, "corrected") == Rule("Q", "bands", "corrected")
    assert selection.resolve_rule(None, "paper") == Rule("Q", "bands", "paper")
    monkeypatch.setattr(selection, "DEFAULT_RULE", "depth")
    assert selection.resolve_rule(None, "paper") == Rule("depth")


def test_measure_variant_takes_the_rules_unless_told_and_refuses_a_contradiction():
    assert selection.measure_variant("bands:Q/corrected") == "corrected"
    assert selection.measure_variant("Q") == "paper" and selection.measure_variant("depth", "corrected") == "corrected"
    assert selection.measure_variant("Q/corrected", "corrected") == "corrected"
    with pytest.raises(ValueError, match="corrected variant, but variant paper was asked for"):
        selection.measure_variant("Q/corrected", "paper")
    with pytest.raises(ValueError, match="unknown knowledge-quality variant 'exact'"):
        selection.measure_variant("Q", "exact")


def report_of(scores, probe=None):
    """A report whose layers 1..n have Q = scores[i], S = -scores[i] (the reverse order)."""
    rows = [LayerQuality(index=i + 1, name=f"l{i + 1}", shape=[4], D=4, S=-q, I=0.5, E=0.5, sqrtIE=0.5, Q=q,
                         probe=None if probe is None else probe[i])
            for i, q in enumerate(scores)]
    return QualityReport(rows, variant="paper", model="net")


def test_select_applies_named_rules_to_a_report():
    report = report_of([0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.4, 0.6], probe=[0.5, 0.6, 0.7, 0.9, 0.2, 0.3, 0.95, 0.1])
    assert report.select(3, "Q") == [1, 3, 6]
    assert report.select(3, "S") == [2, 4, 5]
    assert report.select(3, "depth") == [6, 7, 8]
    assert report.select(2, "probe") == [4, 7]
    assert report.select(2, "bands:Q") == [1, 6]  # bands 1-4 and 5-8
    assert report.select(2, "bands:probe") == [4, 7]
    assert report.select(4, "bands:depth") == [2, 4, 6, 8]  # the deepest layer of every band
    assert report.select(3) == report.select(3, selection.resolve_rule(None, "paper"))  # the default, in paper
    assert report.values("depth") == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert set(report.to_dict(k=2)["selected"]) == {parse_rule(name).in_variant("paper").name
                                                    for name in selection.rule_names()}
    assert report.to_dict(k=2)["selected"]["bands:S/paper"] == [2, 5]
    assert {"Q/paper", "bands:depth", "probe"} <= set(report.rules())


def test_a_rule_naming_a_variant_needs_a_report_in_that_variant():
    report = report_of([0.9, 0.1, 0.8, 0.2])
    assert report.select(2, "Q/paper") == report.select(2, "Q") == [1, 3]
    assert report.select(2, "bands:Q/paper") == [1, 3]
    with pytest.raises(ValueError, match="needs knowledge quality measured in the corrected variant; this "
                                         "report holds the paper variant"):
        report.select(2, "bands:Q/corrected")
    report.variant = "corrected"
    assert report.select(2, "bands:Q/corrected") == [1, 3]


def test_probe_rules_need_a_measured_probe():
    report = report_of([0.3, 0.2, 0.1])
    assert not report.has_probe and "probe" not in report.rules() and "bands:probe" not in report.rules()
    assert "probe" not in report.to_dict()["selected"] and "depth" in report.to_dict()["selected"]
    with pytest.raises(ValueError, match="no probe accuracies"):
        report.select(1, "probe")
    assert report.select(1, "depth") == [3]


def test_set_score_is_the_mean_over_the_set():
    assert selection.set_score({1: 0.2, 2: 0.4, 3: 0.9}, [1, 3]) == pytest.approx(0.55)


def test_candidate_layers_leave_out_the_stem_and_the_head():
    from featkd.models import create_model

    def candidates(name, **kw):
        return selection.candidate_layers(create_model(name, 10, width=1 / 16, **kw), k=4)

    assert candidates("resnet34") == list(range(1, 18))
    assert candidates("vgg19_bn") == list(range(1, 17))  # GLs 17-18 are the classifier's FC-ReLUs
    assert candidates("vit_b") == list(range(1, 13))
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    assert selection.candidate_layers(tiny, k=1) == [1]
    assert selection.candidate_layers(tiny, k=2) == [0, 1]  # too few: every GL


def with_stem_and_head(q):
    """A report of GLs 0..5 with Q = q[i] whose candidates are GLs 1-4 (0: the stem, 5: in the head)."""
    rows = [LayerQuality(index=i, name=f"l{i}", shape=[4], D=4, S=0.0, I=0.5, E=0.5, sqrtIE=0.5, Q=v)
            for i, v in enumerate(q)]
    return QualityReport(rows, variant="paper", model="net", candidates=[1, 2, 3, 4])


def test_select_chooses_among_the_candidates_only():
    report = with_stem_and_head([0.9, 0.1, 0.5, 0.3, 0.2, 0.8])
    assert report.select(2, "Q") == [2, 3]  # neither GL 0 nor GL 5, though their Q is the highest
    assert report.select(4, "Q") == [1, 2, 3, 4]
    assert report.select(2, "bands:Q") == [2, 3]  # bands 1-2 and 3-4
    assert report.select(2, "depth") == [3, 4]
    assert report.select(5, "Q") == [0, 2, 3, 4, 5]  # fewer than k candidates: every layer, as candidate_layers
    assert report.to_dict(k=2)["selected"]["Q/paper"] == [2, 3]
    table = report.table(2, "Q").splitlines()
    assert len(table) == 7 and [line.split()[0] for line in table if line.endswith("*")] == ["2", "3"]
    assert report.values("Q") == [0.9, 0.1, 0.5, 0.3, 0.2, 0.8]  # every layer is still shown
    assert selection.choosable(range(6), [1, 2, 3, 4], 4) == [1, 2, 3, 4]
    assert selection.choosable(range(6), [1, 2, 3, 4], 5) == list(range(6))
    assert selection.choosable([1, 3], None, 2) == [1, 3]


def test_candidates_survive_json_and_old_reports_choose_among_every_layer():
    report = with_stem_and_head([0.9, 0.1, 0.5, 0.3, 0.2, 0.8])
    data = json.loads(report.to_json(k=2))
    assert data["candidates"] == [1, 2, 3, 4]
    again = QualityReport.from_json(report.to_json(k=2))
    assert again.candidates == [1, 2, 3, 4] and again.select(2, "Q") == [2, 3]
    del data["candidates"]  # written before reports held candidates
    old = QualityReport.from_json(json.dumps(data))
    assert old.candidates is None and old.select(2, "Q") == [0, 5] and old.select(2, "bands:Q") == [0, 5]
    report.candidates = None
    assert "candidates" not in report.to_dict()  # a report of candidates only writes what it wrote before


# ------------------------------------------------------------------ the probe
def test_pool_features_average_positions_and_tokens():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool_features(x), x.mean((2, 3)))
    tokens = torch.randn(2, 5, 4)
    assert torch.equal(pool_features(tokens), tokens.mean(1))
    assert pool_features(torch.ones(3, 7)).shape == (3, 7)


def test_probe_halves_are_class_balanced_disjoint_and_seeded():
    labels = torch.tensor([0] * 6 + [1] * 5 + [2] * 4)
    first, second = probe_halves(labels, seed=3)
    assert sorted(first.tolist() + second.tolist()) == list(range(15))
    assert torch.bincount(labels[first]).tolist() == [3, 2, 2]
    assert torch.bincount(labels[second]).tolist() == [3, 3, 2]  # the odd sample goes second
    again = probe_halves(labels, seed=3)
    assert torch.equal(again[0], first) and not torch.equal(probe_halves(labels, seed=4)[0], first)


def test_probe_accuracy_separates_informative_from_random_features():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)
    centres = 3 * torch.randn(4, 16, generator=gen)
    informative = centres[labels] + torch.randn(200, 16, generator=gen)
    noise = torch.randn(200, 16, generator=gen)
    fit, held = torch.arange(100), torch.arange(100, 200)
    assert probe_accuracy(informative[fit], labels[fit], informative[held], labels[held]) == 1.0
    chance = probe_accuracy(noise[fit], labels[fit], noise[held], labels[held])
    assert chance < 0.5
    # labels need not be 0..C-1, constant features are harmless
    shifted = torch.cat([informative, torch.ones(200, 1)], 1)
    assert probe_accuracy(shifted[fit], labels[fit] + 10, shifted[held], labels[held] + 10) == 1.0
    with pytest.raises(ValueError, match="dimensions"):
        probe_accuracy(noise[fit], labels[fit], noise[held, :5], labels[held])
    with pytest.raises(ValueError, match="2 classes"):
        probe_accuracy(noise[:4], torch.zeros(4, dtype=torch.long), noise[4:8], labels[4:8])


@pytest.fixture(scope="module")
def synthetic_train():
    from featkd.data import get_datasets

    train, _ = get_datasets("synthetic", num_classes=3, samples_per_class=16, image_size=8)
    return train


def test_measure_scores_every_layer_with_the_probe(synthetic_train):
    from featkd.data import class_balanced_subset
    from featkd.models import create_model
    from featkd.quality import _cross_probe, measure

    torch.manual_seed(0)
    model = create_model("resnet9", 3, image_size=8, width=1 / 16).eval()
    options = dict(subset_size=30, per_class_b=8, progress=False, seed=2)
    report = measure(model, synthetic_train, [1, 4, 5], **options)
    assert report.has_probe and all(0.0 <= row.probe <= 1.0 for row in report.layers)
    # the same number from the pooled features of subset A, computed directly
    gen = torch.Generator().manual_seed(2)
    subset_a = class_balanced_subset(synthetic_train.labels, 10, gen)
    from featkd.layers import extract

    with torch.no_grad():
        feats = extract(model, synthetic_train.batch(subset_a)[0], [1, 4, 5])
    labels = synthetic_train.labels[subset_a]
    for row, feat in zip(report.layers, feats):
        assert row.probe == pytest.approx(_cross_probe(pool_features(feat), labels, 2))
    held_out = measure(model, synthetic_train, [1, 5], probe_set=synthetic_train, **options)
    assert "held-out split of 48 images" in held_out.settings["probe"]
    assert held_out[5].probe != report[5].probe and held_out[5].Q == report[5].Q
    assert report.select(1, "probe") == [max(report.layers, key=lambda r: (r.probe, r.index)).index]
    assert QualityReport.from_json(report.to_json()).layers[0].probe == report.layers[0].probe
    assert not math.isnan(report.layers[0].probe)


def test_measure_records_the_candidate_layers(synthetic_train):
    from featkd.models import create_model
    from featkd.quality import measure

    torch.manual_seed(0)
    model = create_model("resnet9", 3, image_size=8, width=1 / 16).eval()
    options = dict(subset_size=30, per_class_b=8, progress=False)
    report = measure(model, synthetic_train, "all", **options)
    assert [row.index for row in report.layers] == list(range(6))
    assert report.candidates == selection.candidate_layers(model) == [1, 2, 3, 4, 5]
    assert 0 not in report.select(4, "Q") and 0 not in report.to_dict(k=4)["selected"]["bands:Q/paper"]
    some = measure(model, synthetic_train, [0, 2, 5], **options)
    assert some.candidates == [2, 5] and some.select(2, "depth") == [2, 5]
    assert some.select(3, "depth") == [0, 2, 5]  # fewer than k candidates: every layer measured
    assert measure(model, synthetic_train, [1, 5], **options).candidates is None  # every one a candidate


# ------------------------------------------------------------------ the rule in distillation
def test_auto_teacher_layers_follow_the_selection_rule(tmp_path):
    import featkd.api as api
    from featkd.data import get_datasets
    from featkd.models import create_model

    train, test = get_datasets("synthetic", num_classes=3, samples_per_class=8, test_per_class=4, image_size=8)
    torch.manual_seed(0)
    teacher = create_model("resnet34", 3, 3, 8, 1 / 16).eval()

    def student():
        return create_model("resnet9", 3, 3, 8, 1 / 16)

    options = dict(method="featkd", teacher_name="resnet34", student_name="resnet9", epochs=1, batch_size=8,
                   progress=False, device="cpu")
    deep = api.distill(teacher, student, train, test, select_by="depth", out=str(tmp_path / "depth"), **options)
    assert deep.extra["teacher_layers"] == [14, 15, 16, 17]
    report = QualityReport.from_json(tmp_path / "depth" / "quality.json")
    assert [row.index for row in report.layers] == list(range(1, 18))  # the stem GL 0 left out
    spread = api.distill(teacher, student, train, test, select_by="bands:S", out=str(tmp_path / "bands"),
                         **options)
    report = QualityReport.from_json(tmp_path / "bands" / "quality.json")
    selected = report.to_dict()["selected"]["bands:S/paper"]
    assert spread.extra["teacher_layers"] == report.select(4, "bands:S") == selected
    assert [sum(lo <= t <= hi for t in spread.extra["teacher_layers"]) for lo, hi in
            ((1, 4), (5, 8), (9, 12), (13, 17))] == [1, 1, 1, 1]
    default = api.resolve_teacher_layers("auto", teacher, "resnet34", 4, train, device=torch.device("cpu"),
                                         out=tmp_path / "bands", progress=False)
    saved = QualityReport.from_json(tmp_path / "bands" / "quality.json")  # measured again if the variant differs
    assert default == saved.select(4, selection.DEFAULT_RULE)
    corrected = api.distill(teacher, student, train, test, select_by="bands:Q/corrected",
                            out=str(tmp_path / "corrected"), **options)
    report = QualityReport.from_json(tmp_path / "corrected" / "quality.json")
    assert report.variant == "corrected"  # the rule's variant, without quality_variant
    assert corrected.extra["teacher_layers"] == report.select(4, "bands:Q/corrected")


def test_select_by_is_a_checked_distill_option(tmp_path, capsys):
    from featkd.cli import main
    from featkd.config import DistillConfig

    assert DistillConfig().select_by is None  # the default rule, in quality_variant when that is given
    assert selection.resolve_rule(None) == parse_rule(selection.DEFAULT_RULE)
    DistillConfig(quality_variant="paper").validate()
    DistillConfig(select_by="bands:probe").validate()
    with pytest.raises(ValueError, match="unknown selection rule 'best'"):
        DistillConfig(select_by="best").validate()
    status = main(["distill", "--student", "resnet9", "--teacher", "resnet34", "--select-by", "best",
                   "--out", str(tmp_path / "run")])
    assert status == 2 and "unknown selection rule 'best'; valid: Q" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    DistillConfig(select_by="Q/corrected", quality_variant="corrected").validate()
    with pytest.raises(ValueError, match="rule Q/corrected ranks by knowledge quality in the corrected variant"):
        DistillConfig(select_by="Q/corrected", quality_variant="paper").validate()


def test_selection_options_decide_a_run_only_when_they_choose_its_layers():
    from featkd.config import DistillConfig

    fixed = dict(method="featkd", teacher_layers=[1, 2, 3, 4])
    assert DistillConfig(**fixed, select_by="S", quality_variant="corrected").differences(DistillConfig(**fixed)) == []
    assert DistillConfig(method="ce", select_by="S").differences(DistillConfig(method="ce")) == []
    assert DistillConfig(method="fitnet", quality_subset=9).differences(DistillConfig(method="fitnet")) == []
    assert DistillConfig(select_by="S").differences(DistillConfig(select_by="E")) == ["select_by: 'E' -> 'S'"]
    assert DistillConfig(teacher_layers="auto", method="fitnet", quality_subset=9).differences(
        DistillConfig(teacher_layers="auto", method="fitnet")) == ["quality_subset: 5000 -> 9"]
