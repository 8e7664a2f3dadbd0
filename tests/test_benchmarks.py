"""The benchmark scripts: their statistics, the shared teacher feed, and each script end to end in --quick mode."""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import scipy.stats
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import carry  # noqa: E402
import common  # noqa: E402
import convergence  # noqa: E402
import layer_validity  # noqa: E402
import report  # noqa: E402
import throughput  # noqa: E402

PAIR = "resnet34-resnet9"


# tiny models run fastest on one thread; the scripts set torch's thread count, the fixture restores it
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- statistics
def test_ari_averages_ratios_over_qualifying_baselines():
    gains = {"featkd": 2.0, "kd": 1.0, "fitnet": 4.0, "sp": 0.4, "simkd": -1.0}
    out = common.ari(gains)
    assert out["baselines"] == ["kd", "fitnet"]
    assert out["value"] == pytest.approx((2.0 / 1.0 + 2.0 / 4.0) / 2)


def test_ari_is_undefined_without_a_qualifying_baseline():
    assert common.ari({"featkd": 3.0, "kd": 0.49, "sp": -2.0})["value"] is None
    assert common.ari({"kd": 1.0})["value"] is None  # featkd missing


def test_ari_chooses_its_baselines_on_validation_gains():
    test = {"featkd": 2.0, "kd": 1.0, "fitnet": 4.0, "sp": 2.0}
    val = {"featkd": 1.0, "kd": 0.2, "fitnet": 0.5, "sp": 0.8}
    out = common.ari(test, qualify_by=val)
    assert out["baselines"] == ["fitnet", "sp"] and out["note"] == ""
    assert out["value"] == pytest.approx((2.0 / 4.0 + 2.0 / 2.0) / 2)
    flat = common.ari({**test, "sp": -0.1}, qualify_by=val)  # qualifies on validation, loses on test
    assert flat["value"] is None and flat["note"] == "qualifying sp without a positive test gain"
    assert common.ari(test, qualify_by={"kd": 0.4})["note"] == (
        "no baseline gains 0.5 points or more over ce on validation")


def test_convergence_verdict_is_one_rule_for_the_script_and_the_report():
    assert common.budget_converged(100 * (0.853 - 0.850))  # 0.30000000000000027 points: float noise
    assert not common.budget_converged(0.32) and common.budget_converged(-1.0)
    for budget, long, converged in ((0.850, 0.853, True), (0.850, 0.8532, False)):
        runs = {"final_val_acc": budget, "final_test_acc": 0.84}, {"final_val_acc": long, "final_test_acc": 0.85}
        assert convergence.verdict([convergence.gains(*runs)])["converged"] is converged
        assert report.convergence_check({"budget": runs[0], "long": runs[1]})["passed"] is converged


def test_convergence_over_seeds_judges_the_mean_gain_and_gives_its_interval():
    seeds = [convergence.gains({"final_val_acc": 0.850, "final_test_acc": 0.84},
                               {"final_val_acc": 0.850 + gain, "final_test_acc": 0.84})
             for gain in (0.0034, -0.001, 0.002)]
    out = convergence.verdict(seeds)
    mean = (0.34 - 0.1 + 0.2) / 3
    assert out["val_gain_points"] == pytest.approx(mean) and out["converged"]  # one seed alone: +0.34, not
    t = scipy.stats.t.ppf(0.975, 2) * scipy.stats.tstd([0.34, -0.1, 0.2]) / math.sqrt(3)
    assert out["val_gain_ci"] == pytest.approx((mean - t, mean + t))
    assert convergence.verdict(seeds[:1])["val_gain_ci"] is None


def test_derived_gains_and_ari_use_validation_for_the_choice():
    def entry(test: float, val: float) -> dict:
        return {"final_test_acc": {"mean": test, "std": 0.01}, "test_acc_at_best_val": {"mean": test, "std": 0.01},
                "final_val_acc": {"mean": val, "std": 0.01}}

    out = common.derived({"ce": entry(0.80, 0.80), "featkd": entry(0.82, 0.81), "kd": entry(0.84, 0.802),
                          "sp": entry(0.81, 0.81)})
    assert out["gain_val"]["kd"]["mean"] == pytest.approx(0.2)
    assert out["ari_final"]["baselines"] == ["sp"]  # kd gains 4 points on test but 0.2 on validation
    assert out["ari_final"]["value"] == pytest.approx(2.0 / 1.0)


def test_spearman_matches_known_values_and_handles_ties():
    assert common.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert common.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1.5, 1.5, 3, 4], y ranks [1, 2, 3, 4]
    assert common.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert common.spearman([1, 1, 1], [1, 2, 3]) is None
    assert common.spearman([1, 2], [2, 1]) is None
    with pytest.raises(ValueError):
        common.spearman([1, 2, 3], [1, 2])


def test_mean_std_and_gain():
    stats = common.mean_std([0.80, 0.82, 0.84])
    assert stats["mean"] == pytest.approx(0.82) and stats["std"] == pytest.approx(0.02) and stats["n"] == 3
    assert common.mean_std([0.5])["std"] is None
    gain = common.gain_over({"mean": 0.85, "std": 0.03}, {"mean": 0.80, "std": 0.04})
    assert gain["mean"] == pytest.approx(5.0) and gain["std"] == pytest.approx(5.0)
    assert common.gain_over({"mean": 0.85, "std": None}, {"mean": 0.80, "std": 0.04})["std"] is None


def test_scales_overrides_and_choices():
    scale = common.build_scale("default", epochs=2, seeds=5, data="cifar10")
    assert scale.epochs == {"full": 2, "low": 2} and scale.seeds == 5 and scale.data == "cifar10"
    assert scale.student_epochs == {} and scale.budget("vit_et", "full") == 2  # --epochs overrides every budget
    default = common.build_scale("default")
    assert default.budget("vit_et", "full") == 2 * default.budget("resnet9", "full")  # its own, longer budget
    assert default.budget("vit_et", "low") == 2.25 * default.budget("resnet9", "low")
    # a student without its own budget in a regime falls back to the regime's
    assert default.budget("mobilenetv2", "low") == default.budget("resnet9", "low") == default.epochs["low"]
    assert convergence.long_epochs(default, "vit_et", "full") == 2 * default.budget("vit_et", "full")
    assert common.SCALES["default"].epochs != scale.epochs  # the preset is not mutated
    assert set(common.SCALES["paper"].teacher_widths.values()) == {1.0}
    with pytest.raises(ValueError, match="valid: default"):
        common.build_scale("huge")
    with pytest.raises(ValueError, match="epochs"):
        common.build_scale("quick", epochs=0)
    assert common.parse_choice("kd,ce", common.METHODS, "method") == ["kd", "ce"]
    assert common.parse_choice("all", common.METHODS, "method") == list(common.METHODS)
    with pytest.raises(ValueError, match="valid: ce"):
        common.parse_choice("kd,nope", common.METHODS, "method")


def test_method_order_groups_methods_by_teacher_outputs():
    order = accuracy.method_order(list(reversed(common.METHODS)))
    assert order[0] == "ce"
    assert set(order[:3]) == {"ce", "kd", "kd_std"}
    assert set(order[3:8]) == {"fitnet", "fitnet_fc", "sp", "semckd", "featkd_std"}
    assert order[8] == "simkd"                                  # the teacher's classifier input
    assert set(order[9:]) == {"featkd", "featkd_ce", "featkd_ce_kd"}


def test_job_costs_put_the_longest_jobs_first(tmp_path):
    scale = common.build_scale("default")
    costs = accuracy.job_costs(scale, ["ce"], tmp_path / "no-probe.json")
    assert costs[("vit_b-vit_et", "full")] == 2 * 2 * costs[("resnet34-resnet9", "full")]  # twice the epochs
    (tmp_path / "damaged.json").write_text('{"pairs": {')
    assert accuracy.job_costs(scale, ["ce"], tmp_path / "damaged.json") == costs  # ordered without it
    probe = {"pairs": {p: {"ce": {"cpu": 1e-3 * (i + 1)}} for i, p in enumerate(common.PAIRS)}}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    costs = accuracy.job_costs(scale, ["ce"], tmp_path / "probe.json")
    # 4x the probe's time per image, times the ratio of the two students' epochs
    epochs = scale.budget("vit_et", "low") / scale.budget("vgg11_bn", "low")
    assert costs[("vit_b-vit_et", "low")] == pytest.approx(4 * epochs * costs[("vgg19_bn-vgg11_bn", "low")])


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_waits_for_dependencies_and_skips_after_a_failure(tmp_path, workers):
    note = tmp_path / "note.txt"
    jobs = [  # listed before the job they wait for: the order must come from `after`
        common.Job("read", note.read_text, after=("write",)),
        common.Job("skipped", len, ("abc",), after=("boom",)),
        common.Job("boom", int, ("not a number",)),
        common.Job("write", note.write_text, ("teacher ready",)),
    ]
    ended: list[str] = []
    outcomes = common.run_jobs(jobs, workers, 1, lambda name, _: ended.append(name))
    assert outcomes["write"] == len("teacher ready") and outcomes["read"] == "teacher ready"
    assert ended.index("write") < ended.index("read")
    assert isinstance(outcomes["boom"], ValueError)
    assert isinstance(outcomes["skipped"], common.DependencyFailed) and "boom" in str(outcomes["skipped"])
    assert sorted(ended) == sorted(job.name for job in jobs)


def test_run_jobs_rejects_an_unknown_dependency():
    with pytest.raises(ValueError, match="unknown jobs"):
        common.run_jobs([common.Job("a", len, ("x",), after=("teacher",))], 1, 1)


def test_width_fractions():
    assert report.fraction(0.0625) == "1/16" and report.fraction(1.0) == "1"


# --------------------------------------------------------------------------- shared teacher outputs
def _tiny_setup():
    from featkd.data import get_datasets
    from featkd.models import create_model

    train, test = get_datasets("synthetic", num_classes=3, samples_per_class=8, test_per_class=3, in_channels=1)
    torch.manual_seed(0)
    teacher = create_model("resnet34", 3, in_channels=1, width=1 / 16).eval()
    return train, test, teacher


def _student():
    from featkd.models import create_model

    return create_model("resnet9", 3, in_channels=1, width=1 / 16)


def test_shared_feed_gives_the_same_runs_as_the_default_feed(tmp_path):
    """What accuracy.py does (its DistillConfig + a SharedTeacherFeed) matches a plain featkd.api.distill."""
    from featkd.api import distill
    from featkd.checkpoint import weights_digest
    from featkd.config import DistillConfig

    train, test, teacher = _tiny_setup()
    options = dict(epochs=2, runs=1, seed=0, batch_size=8, device="cpu", progress=False)
    expected = distill(teacher, _student, train, test, method="fitnet", teacher_name="resnet34",
                       student_name="resnet9", **options)
    config = DistillConfig(data="synthetic", method="fitnet", teacher="resnet34", student="resnet9",
                           teacher_mode="cache", out=str(tmp_path), **options)
    feed = common.SharedTeacherFeed(teacher, train, torch.device("cpu"))
    got = distill(teacher, _student, train, test, config=config, method=config.method,
                  teacher_layers=config.teacher_layers, student_layers=config.student_layers,
                  teacher_name=config.teacher, student_name=config.student, teacher_feed=feed)
    assert len(feed.build_seconds) == 1
    idx = torch.tensor([0, 1])
    assert len(feed(train.batch(idx)[0], idx).features) == 4
    assert len(feed.build_seconds) == 1  # the cache was left open for the next method
    feed.close()
    written = DistillConfig.from_yaml(tmp_path / "config.yaml")
    assert written.teacher_sha256 == weights_digest(teacher)  # recorded by distill, unknown to the caller
    assert {**written.to_dict(), "teacher_sha256": None} == config.to_dict()  # resumable
    assert got.extra["teacher_layers"] == expected.extra["teacher_layers"] == [3, 7, 13, 16]
    for key in ("test_acc", "loss"):
        assert [r[key] for r in got.runs[0].history] == pytest.approx([r[key] for r in expected.runs[0].history])


def test_shared_feed_builds_one_cache_per_layer_list():
    from featkd.distillation import build_method

    train, _, teacher = _tiny_setup()
    feed = common.SharedTeacherFeed(teacher, train, torch.device("cpu"))
    x = train.batch(torch.arange(2))[0]
    idx = torch.tensor([0, 5])

    def method(name, layers):
        return build_method(name, teacher, _student(), teacher_layers=layers, student_layers=[1, 2, 3, 4],
                            num_classes=3, sample_input=x)

    feed.configure(method("ce", None))
    assert feed(x, idx) is None
    feed.configure(method("kd", None))
    assert feed(x, idx).logits.shape == (2, 3) and feed(x, idx).features == []
    feed.configure(method("fitnet", [3, 7, 13, 16]))
    first = feed(x, idx)
    feed.configure(method("featkd_std", [3, 7, 13, 16]))  # same layers: no new cache, and no logits handed out
    second = feed(x, idx)
    assert len(feed.build_seconds) == 2
    assert second.logits is None and all(torch.equal(a, b) for a, b in zip(first.features, second.features))
    with torch.no_grad():
        from featkd.layers import extract

        direct = extract(teacher, train.batch(idx)[0], [3, 7, 13, 16])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(second.features, direct))
    from featkd.distillation.losses import resize_to
    from featkd.models import create_model

    small_maps = create_model("mobilenetv2", 3, in_channels=1, width=1 / 16)  # half the teacher's maps
    feed.configure(build_method("featkd", teacher, small_maps, teacher_layers=[3, 7, 13, 16],
                                student_layers=[3, 6, 13, 17], num_classes=3, sample_input=x))
    pooled = feed(x, idx)  # the same cache, its maps pooled once
    assert len(feed.build_seconds) == 2
    for feat, whole in zip(pooled.features, second.features):
        assert torch.equal(feat, resize_to(whole, [s // 2 for s in whole.shape[2:]]))
    feed.close()


def test_shared_feed_runs_the_teacher_online_on_an_accelerator_when_the_cache_is_too_large():
    """The meta device stands in for an accelerator: no cache is built, the teacher runs per batch."""
    import copy

    from featkd.distillation import build_method
    from featkd.layers import extract

    train, _, teacher = _tiny_setup()
    x = train.batch(torch.arange(2))[0]
    method = build_method("fitnet", teacher, _student(), teacher_layers=[3, 7], student_layers=[1, 2],
                          num_classes=3, sample_input=x)
    on_meta = copy.deepcopy(teacher).to("meta")
    feed = common.SharedTeacherFeed(on_meta, train, torch.device("meta"), memory_budget_bytes=1)
    feed.configure(method)
    out = feed(x.to("meta"), torch.tensor([0, 1]))
    expected = [f.shape for f in extract(teacher, x, [3, 7])]
    assert [f.shape for f in out.features] == expected
    assert (out.logits is not None) == method.needs_teacher_logits
    assert feed.build_seconds == []
    feed.close()


# --------------------------------------------------------------------------- scripts end to end (--quick)
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick work dir shared by the scripts (the teacher is trained once, by the CLI)."""
    root = tmp_path_factory.mktemp("bench")
    return {"work": root / "work", "results": root / "results"}


def _args(quick, *extra):
    return ["--quick", "--work", str(quick["work"]), "--results", str(quick["results"]), *extra]


def test_accuracy_quick_writes_results_and_resumes(quick):
    methods = "ce,kd,featkd,featkd_std"
    argv = _args(quick, "--pairs", PAIR, "--regimes", "low", "--methods", methods, "--seeds", "2")
    assert accuracy.main(argv) == 1  # a partial cell (4 of its rows) is reported as incomplete
    path = quick["results"] / f"accuracy_{PAIR}_low.json"
    data = json.loads(path.read_text())
    expected = set(common.rows()) - set(methods.split(","))  # featkd_default is a row: depth is not Q
    assert data["complete"] is False and set(data["missing"]) == expected
    assert data["machine"]["cpu_count"] and data["command"].startswith("python benchmarks/accuracy.py")
    assert data["teacher"]["command"].startswith("featkd train-teacher --model resnet34")
    assert (quick["work"] / "teachers" / "resnet34" / "model.pt").is_file()
    assert len(data["layers"]["q_selected"]) == 4 and data["layers"]["paper_q"]["cifar100"] == [12, 13, 14, 15]
    assert data["methods"]["featkd"]["teacher_layers"] == data["layers"]["q_selected"]
    assert data["methods"]["featkd_std"]["teacher_layers"] == [3, 7, 13, 16]
    for name in methods.split(","):
        entry = data["methods"][name]
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        finals = [r["final_test_acc"] for r in entry["runs"]]
        assert entry["final_test_acc"]["mean"] == pytest.approx(sum(finals) / 2)
    gain = data["gain_final"]["featkd"]["mean"]
    assert gain == pytest.approx(100 * (data["methods"]["featkd"]["final_test_acc"]["mean"]
                                        - data["methods"]["ce"]["final_test_acc"]["mean"]))
    # the ARI by hand: kd is the only baseline run here; it counts when it gains >= 0.5 points over ce
    # on validation, and then needs a positive test gain
    kd_gain = data["gain_final"]["kd"]["mean"]
    qualifies = data["gain_val"]["kd"]["mean"] >= 0.5
    assert data["ari_final"]["baselines"] == (["kd"] if qualifies else [])
    assert data["ari_final"]["value"] == (pytest.approx(gain / kd_gain) if qualifies and kd_gain > 0 else None)
    assert (quick["results"] / "quality_resnet34_low_paper.png").is_file()
    # started again: every run is found finished and kept; a call that trains nothing writes nothing
    written = path.read_bytes()
    assert accuracy.main(argv) == 1
    assert path.read_bytes() == written
    again = json.loads(path.read_text())
    assert again["methods"]["featkd"]["runs"] == data["methods"]["featkd"]["runs"]
    # --seeds 3 adds a seed to the methods named; the others keep theirs, and the cell still needs
    # only the 2 seeds it was run with: extending the rows of a close verdict leaves nothing missing
    extend = _args(quick, "--pairs", PAIR, "--regimes", "low", "--methods", "ce", "--seeds", "3")
    assert accuracy.main(extend) == 1
    more = json.loads(path.read_text())
    ce_runs = more["methods"]["ce"]["runs"]
    assert ce_runs[:2] == data["methods"]["ce"]["runs"] and len(ce_runs) == 3
    assert more["methods"]["kd"] == again["methods"]["kd"] and more["settings"]["seeds"] == 2
    assert set(more["missing"]) == expected and more["unfinished"] == {}
    assert more["commands"][0] == data["command"] and len(more["commands"]) == 2  # each call's, once
    assert more["commands"][1].endswith("--methods ce --seeds 3") and more["command"] == more["commands"][1]
    assert accuracy.main(argv) == 1  # back to 2 seeds: nothing is retrained, ce keeps its 3
    assert json.loads(path.read_text())["methods"]["ce"]["runs"] == more["methods"]["ce"]["runs"]
    # other settings (here the epochs) never replace a results file's finished rows
    kept = path.read_bytes()
    assert accuracy.main([*argv, "--epochs", "3"]) == 1
    assert path.read_bytes() == kept


def test_convergence_quick_checks_seeds_and_keeps_the_ones_in_its_results_file(quick, tmp_path):
    argv = _args(quick, "--pairs", PAIR, "--regimes", "low", "--seeds", "2")
    assert convergence.main(argv) in (0, 1)  # 1: a budget that is not converged (synthetic data, 2 epochs)
    path = quick["results"] / f"convergence_{PAIR}_low.json"
    data = json.loads(path.read_text())
    assert data["seeds"] == [0, 1] and [run["seed"] for run in data["runs"]] == [0, 1]
    assert data["long_epochs"] > data["budget_epochs"] and data["method"] == "ce"
    gains = [100 * (run["long"]["final_val_acc"] - run["budget"]["final_val_acc"]) for run in data["runs"]]
    assert data["val_gain_points"] == pytest.approx(sum(gains) / 2) and len(data["val_gain_ci"]) == 2
    assert data["converged"] == common.budget_converged(data["val_gain_points"])
    assert all(run["command"].startswith("python benchmarks/convergence.py") for run in data["runs"])
    # a fresh work directory (a fresh checkout): the seeds in the results file are kept, seed 2 is trained
    fresh = _args({"work": tmp_path / "work", "results": quick["results"]}, "--pairs", PAIR, "--regimes", "low",
                  "--seeds", "3")
    assert convergence.main(fresh) in (0, 1)
    again = json.loads(path.read_text())
    assert again["seeds"] == [0, 1, 2] and again["runs"][:2] == data["runs"]
    trained = sorted(p.name for p in (tmp_path / "work" / "convergence").rglob("epochs-*"))
    assert trained == [f"epochs-{data['budget_epochs']}-seed-2", f"epochs-{data['long_epochs']}-seed-2"]
    # a file from before checks had several seeds: its seed 0 is kept
    old = {key: data[key] for key in (*convergence.identity_of(common.build_scale("quick"), PAIR, "low"),
                                      "command", "git_commit")}
    path.write_text(json.dumps({**old, "seed": 0, "budget": data["runs"][0]["budget"],
                                "long": data["runs"][0]["long"]}))
    before = path.read_text()
    elsewhere = {"work": tmp_path / "elsewhere", "results": quick["results"]}
    assert convergence.main(_args(elsewhere, "--pairs", PAIR, "--regimes", "low")) in (0, 1)
    assert path.read_text() == before and not (tmp_path / "elsewhere").exists()  # nothing trained or rewritten
    assert convergence.main(_args(elsewhere, "--pairs", PAIR, "--regimes", "low", "--seeds", "2")) in (0, 1)
    rewritten = json.loads(path.read_text())
    assert rewritten["seeds"] == [0, 1] and rewritten["runs"][0]["budget"] == data["runs"][0]["budget"]
    assert rewritten["runs"][0]["command"] == data["command"]
    text = "\n".join(report.section_convergence(report.load_results(quick["results"])))
    row = next(line for line in text.splitlines() if line.startswith(f"| {PAIR} | low | 0, 1 |"))
    low, high = rewritten["val_gain_ci"]
    assert f"| {rewritten['val_gain_points']:+.2f} [{low:+.2f}, {high:+.2f}] |" in row


def test_convergence_keeps_runs_only_from_a_file_checked_the_same_way(tmp_path):
    identity = convergence.identity_of(common.build_scale("default"), PAIR, "low")
    run = {"final_val_acc": 0.85, "final_test_acc": 0.84}
    legacy = {key: identity[key] for key in ("pair", "regime", "student", "student_width", "train_images",
                                             "val_images", "budget_epochs", "long_epochs")}
    legacy.update(seed=0, budget=run, long=run, command="python benchmarks/convergence.py", git_commit="abc")
    path = tmp_path / "convergence.json"
    path.write_text(json.dumps(legacy))  # the default scale's file from before data and batch size were recorded
    kept = convergence.kept_runs(path, identity)
    assert list(kept) == [0] and kept[0]["val_gain_points"] == 0.0 and kept[0]["command"] == legacy["command"]
    path.write_text(json.dumps({**legacy, "command": "python benchmarks/convergence.py --data cifar10"}))
    with pytest.raises(ValueError, match=r"other settings \(batch_size, data, data_options, scale\)"):
        convergence.kept_runs(path, identity)  # never replaced: its check stays as it was
    with pytest.raises(ValueError, match="other settings"):
        convergence.kept_runs(path, {**identity, "data": "cifar10"})
    path.write_text(json.dumps({**identity, "batch_size": 64, "runs": [{"seed": 0, "budget": run, "long": run}]}))
    with pytest.raises(ValueError, match=r"other settings \(batch_size\)"):
        convergence.kept_runs(path, identity)  # trained with another batch size
    assert list(convergence.kept_runs(path, {**identity, "batch_size": 64})) == [0]


def test_quality_report_reuses_the_record_of_the_same_teacher_only(quick, tmp_path, monkeypatch):
    """A fresh work folder takes the results folder's quality report of the same teacher weights
    (nothing measured, the record untouched); other weights are measured again."""
    import featkd.quality
    from featkd.checkpoint import load_tensors, save_tensors

    scale = common.build_scale("quick")
    record = quick["results"] / "quality_resnet34_low_paper.json"  # written by the accuracy run above
    written = record.read_bytes()
    fresh = tmp_path / "work"
    shutil.copytree(quick["work"] / "teachers", fresh / "teachers")

    def measure(*args, **kwargs):
        raise RuntimeError("measured")

    monkeypatch.setattr(featkd.quality, "measure", measure)
    report, seconds = common.quality_report(scale, "resnet34", "low", fresh, "paper", quick["results"])
    assert report.settings["teacher_sha256"] == common.teacher_digest(scale, "resnet34", fresh)
    assert seconds == json.loads(written)["settings"]["seconds"]  # the record's, not a new measurement's
    cache = common.quality_path(fresh, "resnet34", "low", "paper")
    assert record.read_bytes() == written and cache.read_bytes() == written
    again, _ = common.quality_report(scale, "resnet34", "low", fresh, "paper")  # from the cache
    assert again.to_dict() == report.to_dict()
    # retrained: the same architecture with other weights
    weights = fresh / "teachers" / "resnet34" / "model.pt"
    tensors = load_tensors(weights)
    tensors["stem.conv.weight"] = tensors["stem.conv.weight"] * 1.01
    save_tensors(weights, tensors)
    for results in (quick["results"], None):
        with pytest.raises(RuntimeError, match="measured"):
            common.quality_report(scale, "resnet34", "low", fresh, "paper", results)
    assert record.read_bytes() == written


def test_accuracy_resumes_seed_by_seed_from_the_results_file_alone(quick, tmp_path, monkeypatch):
    """A new checkout has the committed results file but no work directory: the seeds it lists as
    finished are kept, only the others train."""
    import featkd.api

    real, seeds_trained = featkd.api.distill, []

    def failing_on_seed_1(*args, config, **kwargs):
        if config.seed == 1:
            raise RuntimeError("interrupted")
        seeds_trained.append(config.seed)
        return real(*args, config=config, **kwargs)

    argv = ["--quick", "--work", str(quick["work"]), "--results", str(tmp_path), "--pairs", PAIR,
            "--regimes", "low", "--methods", "kd", "--seeds", "2"]
    monkeypatch.setattr(featkd.api, "distill", failing_on_seed_1)
    assert accuracy.main(argv) == 1
    first = json.loads((tmp_path / f"accuracy_{PAIR}_low.json").read_text())
    assert "Error: interrupted" in first["methods"]["kd"]["error"]
    assert [r["seed"] for r in first["unfinished"]["kd"]["runs"]] == [0] and seeds_trained == [0]

    for row_dir in quick["work"].glob(f"**/runs/{PAIR}/low/kd"):
        shutil.rmtree(row_dir)  # the work directory of another session is gone
    seeds_trained.clear()
    monkeypatch.setattr(featkd.api, "distill", lambda *a, config, **k: seeds_trained.append(config.seed)
                        or real(*a, config=config, **k))
    assert accuracy.main(argv) == 1
    again = json.loads((tmp_path / f"accuracy_{PAIR}_low.json").read_text())
    kd = again["methods"]["kd"]
    assert seeds_trained == [1] and again["unfinished"] == {}
    assert [r["seed"] for r in kd["runs"]] == [0, 1] and kd["runs"][0] == first["unfinished"]["kd"]["runs"][0]
    assert kd["final_test_acc"]["n"] == 2


def test_cell_results_keep_what_other_processes_wrote(tmp_path):
    """Two processes on one cell: each save rereads the file, so neither loses the other's rows."""
    settings = {"seeds": 2, "epochs": 3}

    def cell(command):
        head = {"command": command, "settings": dict(settings), "teacher_cache_builds": [{"seconds": len(command)}]}
        return accuracy.CellResults(tmp_path / "accuracy_x_low.json", tmp_path / "x.lock", head)

    def entry(*seeds):
        runs = [{"seed": s, "finished": True, "final_test_acc": 0.5, "final_val_acc": 0.5,
                 "test_acc_at_best_val": 0.5, "train_time_s": 1.0, "images_per_s": 9.0} for s in seeds]
        return {**common.summarize_runs(runs, 10), "method": "m"}

    first, second = cell("python a"), cell("python b --methods kd")
    assert first.data() == {"complete": False}  # no file yet
    first.save("ce", unfinished=entry(0))
    second.save("kd", unfinished=entry(0))  # b never read what a wrote, nor a what b wrote
    first.save("ce", done=entry(0, 1), unfinished=None)
    data = second.save("kd", done=entry(0, 1), unfinished=None)
    assert set(data["methods"]) == {"ce", "kd"} and data["unfinished"] == {}
    assert data["commands"] == ["python a", "python b --methods kd"]
    assert data["teacher_cache_builds"] == [{"seconds": 8}, {"seconds": 21}]
    assert first.data() == data
    other = accuracy.CellResults(first.path, first.lock, {**first.head, "settings": {"seeds": 2, "epochs": 9}})
    assert other.data() == {"complete": False}  # a file with other settings is not this cell's
    failed = first.save("sp", done={"error": "RuntimeError: nan"})  # a failure stays in the file
    assert failed["methods"]["sp"]["error"] and set(failed["methods"]) == {"ce", "kd", "sp"}
    assert "sp" not in first.read().methods and first.read(keep_errors=True).methods["sp"] == failed["methods"]["sp"]


def test_a_failed_extra_seed_keeps_the_finished_row(tmp_path):
    """A row finished with 2 seeds and asked for 3: the third fails, the 2-seed row stays in the report."""
    runs = [{"seed": s, "finished": True, "final_test_acc": 0.5, "final_val_acc": 0.5, "test_acc_at_best_val": 0.5,
             "train_time_s": 1.0, "images_per_s": 9.0} for s in (0, 1)]
    finished = {**common.summarize_runs(runs, 10), "method": "kd"}
    cell = accuracy.CellResults(tmp_path / "accuracy_x_low.json", tmp_path / "x.lock",
                                {"command": "python a", "settings": {"seeds": 3}, "teacher_cache_builds": []})
    cell.save("kd", done=finished)

    def failing(row, seed):
        raise RuntimeError(f"nan loss in seed {seed}")

    data = accuracy.train_row("kd", cell, failing, 3, "x low")
    assert data["methods"]["kd"] == finished and "error" not in data["methods"]["kd"]
    assert data["unfinished"]["kd"]["error"] == "RuntimeError: nan loss in seed 2"
    assert cell.read().methods["kd"] == finished
    fresh = accuracy.train_row("sp", cell, failing, 3, "x low")  # a row with nothing finished fails as before
    assert fresh["methods"]["sp"] == {"error": "RuntimeError: nan loss in seed 0"}


def test_accuracy_leaves_a_row_another_process_is_training(quick, tmp_path):
    """A row whose lock another process holds is skipped, not trained twice in the same run directory."""
    argv = ["--quick", "--work", str(quick["work"]), "--results", str(tmp_path), "--pairs", PAIR,
            "--regimes", "low", "--methods", "ce,kd", "--seeds", "1"]
    runs_dir = quick["work"] / "runs" / PAIR / "low"
    with common.file_lock(runs_dir / "kd.lock", wait=False) as held:
        assert held
        with common.file_lock(runs_dir / "kd.lock", wait=False) as again:
            assert not again  # flock: even this process, through another handle, is refused
        assert accuracy.main(argv) == 1
    data = json.loads((tmp_path / f"accuracy_{PAIR}_low.json").read_text())
    assert "ce" in data["methods"] and "kd" not in data["methods"] and "kd" in data["missing"]
    assert accuracy.main(argv) == 1  # the lock is free again: kd trains now, ce is kept
    again = json.loads((tmp_path / f"accuracy_{PAIR}_low.json").read_text())
    assert again["methods"]["ce"] == data["methods"]["ce"]
    assert [r["seed"] for r in again["methods"]["kd"]["runs"]] == [0]


def test_accuracy_rejects_unknown_names(quick, capsys):
    assert accuracy.main(_args(quick, "--methods", "featkd,magic")) == 2
    assert "valid: ce" in capsys.readouterr().err
    for option, value in (("--threads", "-1"), ("--workers", "0"), ("--probe-steps", "0")):
        assert accuracy.main(_args(quick, option, value)) == 2
        assert f"{option[2:]} must be >= 1, got {value}" in capsys.readouterr().err


def test_layer_validity_plan():
    assert layer_validity.matched_layer(1, list(range(1, 18)), 4) == 1
    assert layer_validity.matched_layer(17, list(range(1, 18)), 4) == 4
    assert [layer_validity.matched_layer(t, list(range(1, 13)), 7) for t in (1, 4, 6, 7, 12)] == [1, 3, 4, 4, 7]
    assert layer_validity.spread(list(range(1, 18)), 5) == [1, 5, 9, 13, 17]
    assert layer_validity.spread([1, 2, 3], None) == [1, 2, 3]
    sets = layer_validity.random_sets(list(range(1, 13)), 20, seed=0)
    assert len(sets) == 20 and len({tuple(s) for s in sets}) == 20 and all(s == sorted(s) for s in sets)
    assert sets == layer_validity.random_sets(list(range(1, 13)), 20, seed=0)  # seeded
    assert len(layer_validity.random_sets([1, 2, 3, 4, 5], 20)) == 5  # only 5 exist
    plan = layer_validity.configurations([1, 2, 3, 4, 5], [1, 2, 3, 4],
                                         {"random": [[1, 2, 3, 4]], "rules": [[1, 2, 3, 4], [2, 3, 4, 5]]})
    assert [e["teacher_layers"] for e in plan["sets"]] == [[1, 2, 3, 4], [2, 3, 4, 5]]  # duplicates once
    assert plan["deepest"][0] == {"teacher_layers": [1], "student_layers": [4]}
    assert [e["student_layers"] for e in plan["matched"]] == [[1], [2], [3], [3], [4]]
    assert layer_validity.config_key(plan["sets"][1]) == "t2-3-4-5_s1-2-3-4"
    assert "bands:S/corrected" in layer_validity.rule_ids() and "probe" in layer_validity.predictor_ids()


def test_layer_validity_quick(quick):
    argv = _args(quick, "--pairs", PAIR)
    assert layer_validity.main(argv) == 0
    path = quick["results"] / "layer_validity_resnet34.json"
    data = json.loads(path.read_text())
    assert data["complete"] and data["missing"] == [] and data["student"] == "resnet9"
    assert data["candidate_layers"] == [1, 5, 9, 13, 17]  # quick: 5 of GLs 1..17, evenly spread
    assert set(data["predictors"]) == set(layer_validity.predictor_ids())
    assert data["predictors"]["depth"] == {str(t): float(t) for t in data["candidate_layers"]}
    assert all(0 <= v <= 1 for v in data["predictors"]["probe"].values())
    assert set(data["rule_sets"]) == set(layer_validity.rule_ids())
    assert data["rule_sets"]["depth"] == [5, 9, 13, 17] and len(data["random_sets"]) == 2
    runs = data["runs"]
    sets = [runs[k]["teacher_layers"] for k in data["protocols"]["sets"]]
    assert all(s in sets for s in data["random_sets"] + list(data["rule_sets"].values()))
    assert [runs[k]["student_layers"] for k in data["protocols"]["deepest"]] == [[4]] * 5
    assert [runs[k]["student_layers"] for k in data["protocols"]["matched"]] == [[1], [2], [3], [3], [4]]
    chosen = [layer_validity.config_key({"teacher_layers": s, "student_layers": data["student_layers"]})
              for s in layer_validity.chosen_sets(data)]
    assert chosen and all(set(runs[k]["seeds"]) == set(runs[k]["val_seeds"]) == {"0", "1"} for k in chosen)
    assert all(set(runs[k]["seeds"]) == {"0"} for k in runs if k not in chosen)  # quick: lv_seeds 1
    # the report's rho over the layers, against an independent implementation
    import validity_report

    deepest = [runs[k] for k in data["protocols"]["deepest"]]
    q = [data["predictors"]["Q/paper"][str(r["teacher_layers"][0])] for r in deepest]
    with warnings.catch_warnings():  # a constant input is handled below
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        rho = scipy.stats.spearmanr(q, [r["final_val_acc"]["mean"] for r in deepest]).statistic  # never test
    got = validity_report.analyse({"resnet34": data}, n_boot=20)["deepest"]["rho"]["Q/paper"]["teachers"]
    if math.isnan(rho):  # a constant input: undefined for both
        assert math.isnan(got["resnet34"]["rho"])
    else:
        assert got["resnet34"]["rho"] == pytest.approx(rho)
    # started again: every configuration is kept from the results file and none runs again (its run
    # directories are gone, so a rerun would retrain and change the timings)
    for folder in quick["work"].rglob("layer_validity"):
        shutil.rmtree(folder)
    assert layer_validity.main(argv) == 0
    assert json.loads(path.read_text())["runs"] == runs
    assert layer_validity.main(_args(quick, "--pairs", "resnet34-mobilenetv2")) == 2  # not an lv pair


def test_layer_validity_asks_for_missing_teachers(tmp_path, capsys):
    argv = ["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--teachers", str(tmp_path / "none"),
            "--pairs", "vit_b-vit_et"]
    assert layer_validity.main(argv) == 2
    err = capsys.readouterr().err
    assert f"no trained teacher at {tmp_path / 'none' / 'vit_b'}" in err and "featkd train-teacher --model vit_b" in err


def test_throughput_quick(quick, eager_compile):
    assert throughput.main(_args(quick)) == 0
    data = json.loads((quick["results"] / "throughput.json").read_text())
    assert data["complete"] and [c["teacher_mode"] for c in data["cases"].values()][-3:] == ["cache", "online", "cache"]
    assert [label for label, c in data["cases"].items() if c["compiled"]] == ["featkd (cached, compiled)"]
    assert data["cases"]["ce"]["speed_vs_ce"] == pytest.approx(1.0)
    for case in data["cases"].values():
        assert case["images_per_s"] > 0 and case["peak_memory_mb"] > 0 and not math.isnan(case["epoch_time_s"])


def test_report_renders_results_and_marks_missing_cells(quick, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(quick["results"]), "--out", str(out)]) == 0
    text = out.read_text()
    data = json.loads((quick["results"] / f"accuracy_{PAIR}_low.json").read_text())
    featkd = report.mean_std_points(report.seed_points(data["methods"]["featkd"]))
    assert f"| featkd | {featkd} | 2 |" in text
    assert "| semckd | missing |" in text and "**partial**" in text
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert "Not run yet, so in no table or verdict below:" in summary and "vit_b-vit_et low" in summary
    assert "## Which rule picks the teacher layers? (`benchmarks/layer_validity.py`)" in text
    assert "- resnet34-resnet9: teacher width 0.0625" in text and "### Held-out check" in text
    assert "featkd (online teacher)" in text
    assert "quality_resnet34_low_paper.png" in text
    assert "generated by `python benchmarks/report.py`" in text.splitlines()[0]
    assert f"from {quick['results']}/*.json" in text.splitlines()[0]
    assert "## Further checks" not in text


def test_report_links_the_reports_of_further_checks(tmp_path):
    extra = tmp_path / "results" / "longer_budget"
    extra.mkdir(parents=True)
    (extra / "accuracy_resnet34-resnet9_large.json").write_text(json.dumps({"command": "python x.py --epochs 8"}))
    (extra / "convergence_resnet34-resnet9_large.json").write_text(json.dumps(
        {"commands": ["python y.py --seeds 3", "python y.py --seeds 5"], "command": "python y.py --seeds 5"}))
    (extra / "REPORT.md").write_text("# extra\n")
    text = report.render(tmp_path / "results", tmp_path / "BENCHMARKS.md")
    assert "## Further checks" in text
    assert ("- [longer_budget](results/longer_budget/REPORT.md): `python x.py --epochs 8`; "
            "`python y.py --seeds 3`; `python y.py --seeds 5`") in text  # every command that wrote a file


def test_report_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    text = report.render(tmp_path / "empty", tmp_path / "B.md")
    assert "No accuracy results yet" in text and "No results yet: run `python benchmarks/layer_validity.py`" in text
    assert "Does Q pick the layers" not in text  # the earlier one-file format's section: only with its file
    assert report.main(["--results", str(tmp_path / "nothing"), "--out", str(tmp_path / "B.md")]) == 2


def test_probe_quick_estimates_the_suite(quick):
    argv = _args(quick, "--probe", "--pairs", PAIR, "--methods", "ce,kd,fitnet,featkd", "--probe-steps", "1",
                 "--no-probe-quality")
    assert accuracy.main(argv) == 0
    probe = json.loads((quick["results"] / "probe.json").read_text())
    timings = probe["pairs"][PAIR]
    assert {"teacher_train", "teacher_forward", "ce", "featkd", "student_eval"} <= set(timings)
    assert all(t["min"] <= t["median"] for t in timings.values())
    # the estimate is built from measured times, so only its structure is checked here (its arithmetic is
    # checked on fixed times below): one per statistic, one part per (pair, regime)
    assert set(probe["estimate"]) == set(accuracy.STATISTICS)
    assert set(probe["estimate"]["median"]["cells_cpu_s"]) == {f"{PAIR} full", f"{PAIR} low"}


def _fixed_probe(scale: common.Scale) -> dict:
    """A probe file's content with 1 ms per image everywhere, as --probe writes it."""
    steps = ("teacher_train", "teacher_forward", "ce", "kd", "fitnet", "featkd", "student_eval")
    return {"scale": scale.to_dict(), "steps": 1, "batch_size": scale.batch_size,
            "machine": {"torch_threads": 1, "load_average": None},
            "pairs": {PAIR: {k: {"median": 1e-3, "min": 1e-3, "cpu": 1e-3} for k in steps}},
            "quality_s": {"resnet34": {"median": 5.0, "min": 5.0, "cpu": 5.0}}, "lv_layers": 5, "estimate": {}}


def test_re_estimate_uses_the_probe_times_with_the_current_settings(tmp_path):
    path = tmp_path / "probe.json"
    common.write_json(path, _fixed_probe(common.build_scale("quick")))
    argv = ["--quick", "--results", str(tmp_path), "--pairs", PAIR, "--methods", "ce,featkd"]
    assert accuracy.main([*argv, "--re-estimate", "--epochs", "3"]) == 0
    probe = json.loads(path.read_text())
    again = accuracy.main([*argv, "--re-estimate"])  # the preset's 1 epoch
    assert again == 0 and probe["re_estimated"]["scale"]["epochs"] == {"full": 3, "low": 3}
    one, three = (p["estimate"]["cpu"]["cells_cpu_s"] for p in (json.loads(path.read_text()), probe))
    # a cell is its 3 teacher caches plus the runs, which grow with the epochs
    images = {"full": 40, "low": 24}  # quick: 4 classes x 12 images, 8 held out for validation; low keeps 24
    for regime, n in images.items():
        caches = 3 * n * 1e-3
        assert three[f"{PAIR} {regime}"] - caches == pytest.approx(3 * (one[f"{PAIR} {regime}"] - caches))


def test_re_estimate_refuses_times_that_do_not_apply(tmp_path, capsys):
    path = tmp_path / "probe.json"
    probe = _fixed_probe(common.build_scale("quick"))
    probe["scale"]["student_widths"]["resnet9"] = 1.0
    common.write_json(path, probe)
    before = path.read_text()
    argv = ["--quick", "--results", str(tmp_path), "--re-estimate"]
    assert accuracy.main([*argv, "--methods", "ce"]) == 2
    assert "timed other student_widths" in capsys.readouterr().err and path.read_text() == before
    common.write_json(path, _fixed_probe(common.build_scale("quick")))
    assert accuracy.main([*argv, "--methods", "ce,sp"]) == 2
    assert "no times for sp" in capsys.readouterr().err
    assert accuracy.main(["--quick", "--results", str(tmp_path / "none"), "--re-estimate"]) == 2
    path.write_text('{"scale": {')  # damaged: named, no traceback
    assert accuracy.main([*argv, "--methods", "ce"]) == 2
    assert f"{path} is not valid JSON" in capsys.readouterr().err


def test_estimate_suite_is_arithmetic_on_the_probe_times():
    """Fixed per-image times (1 ms everywhere) give costs that can be counted by hand."""
    scale = common.build_scale("quick")  # 1 epoch, 1 seed; layer validity: 1 seed, rule sets 2, 2 random sets
    timing = {k: {"median": 0.001} for k in ("teacher_train", "teacher_forward", "ce", "kd", "fitnet", "featkd",
                                               "student_eval")}
    probe = {"pairs": {PAIR: timing}, "quality_s": {"resnet34": {"median": 5.0}}, "lv_layers": 5}
    est = accuracy.estimate_suite(scale, probe, {"full": 100, "low": 10}, eval_images=20, methods=["ce"], workers=2)
    # a cell: 3 teacher caches over its images + ce for 1 epoch (its images, then 20 evaluated)
    assert est["cells_cpu_s"] == pytest.approx({f"{PAIR} full": 0.3 + 0.12, f"{PAIR} low": 0.03 + 0.03})
    assert est["students_cpu_s"] == pytest.approx(0.48)
    # layer validity (low regime, 10 images): a run costs 0.03 s, a configuration adds its teacher cache
    # (0.01 s); 2 x 5 layers + 2 random sets at 1 seed, every rule's set and the standard set at 2 seeds
    rules = len(layer_validity.rule_ids()) + 1
    assert est["layer_validity_cpu_s"] == pytest.approx(5.0 + 12 * 0.04 + rules * 0.07)
    phases = [v for k, v in est.items() if k.endswith("_cpu_s") and k != "cells_cpu_s"]
    assert est["cpu_s"] == pytest.approx(sum(phases))
    # a phase's wall time: max(its jobs / 2 workers, its longest job); the suite's: the phases added up
    assert est["quality_wall_s"] == pytest.approx(5.0)  # two 5 s jobs, one per worker
    assert est["students_wall_s"] == pytest.approx(0.42)  # the full cell outlasts half of both
    assert est["wall_s"] == pytest.approx(sum(v for k, v in est.items() if k.endswith("_wall_s")))


def test_a_restarted_layer_validity_run_keeps_the_results_it_finds(tmp_path):
    head = {"settings": {"epochs": 24, "seeds": 2}, "candidate_layers": [1, 2], "student_layers": [4],
            "rule_sets": {"depth": [2]}, "random_sets": [], "standard_set": None}
    protocols = {"deepest": [{"teacher_layers": [1], "student_layers": [4]},
                             {"teacher_layers": [2], "student_layers": [4]}]}
    path = tmp_path / "layer_validity_t.json"
    assert layer_validity.kept_runs(path, head, protocols) == {}  # no file yet
    runs = {"t1_s4": {"final_val_acc": {"mean": 0.5}}, "t9_s4": {"final_val_acc": {"mean": 0.9}}}
    common.write_json(path, {**head, "runs": runs})
    assert layer_validity.kept_runs(path, head, protocols) == {"t1_s4": runs["t1_s4"]}  # t9: no longer planned
    other = {**head, "settings": {"epochs": 8, "seeds": 2}}
    assert layer_validity.kept_runs(path, other, protocols) == {}  # other settings: nothing kept


# --------------------------------------------------------------------------- carry
def test_carry_takes_an_unfinished_run_to_a_fresh_checkout_where_it_resumes_exactly(tmp_path):
    from torch import nn

    from featkd.api import train_teacher
    from featkd.data import get_datasets
    from featkd.train import read_metrics

    train, test = get_datasets("synthetic", num_classes=3, samples_per_class=8, test_per_class=4, image_size=8)

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    options = dict(epochs=3, lr=0.01, batch_size=8, progress=False, device="cpu")
    work, inflight = tmp_path / "work", tmp_path / "inflight"
    cut, done = work / "runs" / "pair" / "full" / "ce" / "run-0", work / "runs" / "pair" / "full" / "kd" / "run-0"
    train_teacher(net, train, test, out=str(cut), stop_after_epochs=1, **options)
    train_teacher(net, train, test, out=str(done), **options)

    assert carry.save(work, inflight) == {"saved": [str(cut.relative_to(work))], "dropped": []}
    assert not (inflight / done.relative_to(work)).exists()  # finished runs live in the results files
    assert carry.save(work / "absent", inflight)["dropped"] == []  # not restored yet: kept

    shutil.rmtree(work)  # the fresh checkout
    assert carry.restore(work, inflight) == {"restored": [str(cut.relative_to(work))], "kept": []}
    assert carry.epochs_done(cut) == 1
    resumed = train_teacher(net, train, test, out=str(cut), **options)
    train_teacher(net, train, test, out=str(tmp_path / "whole"), **options)
    assert resumed.finished
    timing = ("epoch_time_s", "images_per_s")
    assert ([{k: v for k, v in r.items() if k not in timing} for r in read_metrics(cut)]
            == [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "whole")])

    assert carry.restore(work, inflight)["kept"] == [str(cut.relative_to(work))]  # finished here: left alone
    assert carry.save(work, inflight) == {"saved": [], "dropped": [str(cut.relative_to(work))]}
    assert not inflight.exists() or not any(inflight.iterdir())


def test_carry_restore_keeps_a_run_that_is_further_along(tmp_path):
    work, inflight = tmp_path / "work", tmp_path / "inflight"
    for root, epochs in ((work, 5), (inflight, 2)):
        run = root / "runs" / "ce" / "run-0"
        run.mkdir(parents=True)
        (run / "checkpoint.pt").write_bytes(str(epochs).encode())
        (run / "metrics.jsonl").write_text("{}\n" * epochs)
    assert carry.restore(work, inflight) == {"restored": [], "kept": ["runs/ce/run-0"]}
    assert (work / "runs" / "ce" / "run-0" / "checkpoint.pt").read_bytes() == b"5"
    assert carry.save(work, inflight)["saved"] == ["runs/ce/run-0"]  # the newer one replaces the old entry
    assert (inflight / "runs" / "ce" / "run-0" / "checkpoint.pt").read_bytes() == b"5"
    assert sorted(p.name for p in (inflight / "runs" / "ce").iterdir()) == ["run-0"]  # no staging left
    fresh = tmp_path / "fresh"
    assert carry.main(["restore", "--work", str(fresh), "--inflight", str(inflight)]) == 0
    assert (fresh / "runs" / "ce" / "run-0" / "checkpoint.pt").read_bytes() == b"5"


def test_baselines_without_a_test_leave_sensitivity_unjudged():
    """A baseline vs ce with no test (one seed, or both samples constant) cannot show the cell insensitive."""
    def entry(accs):
        return {"runs": [{"seed": s, "finished": True, "final_test_acc": a / 100} for s, a in enumerate(accs)]}

    one_seed = {"methods": {"ce": entry([85.0]), **{b: entry([85.5]) for b in common.BASELINES}}}
    s = report.analyse(one_seed)
    assert all(s.vs_ce[b].p is None for b in common.BASELINES)
    assert not s.judged and s.sensitive == []
    assert s.pending == "7 of 7 baselines run (7 without a test)"
    assert report.sensitivity_text(s).startswith("Sensitivity not known yet (7 of 7 baselines run (7 without a test)")
    tested = {"methods": {"ce": entry([85.0, 85.2, 84.8]), **{b: entry([85.1, 84.9, 85.3]) for b in common.BASELINES}}}
    tested["methods"]["kd"] = entry([85.1])  # one untested baseline still leaves the cell open
    s = report.analyse(tested)
    assert not s.judged and s.pending == "7 of 7 baselines run (1 without a test), none beats ce so far"
    tested["methods"]["kd"] = entry([85.1, 84.9, 85.3])
    assert report.analyse(tested).judged
    tested["methods"]["sp"] = {"error": "RuntimeError: nan loss", "runs": []}  # failed for good: says so
    s = report.analyse(tested)
    assert not s.judged and s.failed == ["sp"]
    assert s.pending == "6 of 7 baselines run, none beats ce so far, sp failed (rerun to judge)"
