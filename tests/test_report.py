"""benchmarks/report.py on a small synthetic results folder: verdicts, flags and numbers in the Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import report  # noqa: E402

from featkd import stats  # noqa: E402

PAIR = "resnet34-resnet9"
TEACHER_ACC = 0.92
NOISY = [80.0, 81.0, 79.0]  # per-seed accuracies (%) of the low cell, where nothing differs

#: full regime: kd beats ce (the cell is sensitive); featkd beats ce, kd and featkd_ce, ties featkd_std,
#: loses to featkd_ce_kd; featkd_default has one seed (no test). featkd - simkd (+1.8, p 0.084) exceeds the old
#: noise rule sqrt(s1² + s2²) = 1.02 and its one-sided p is 0.042, yet it is no significant difference.
FULL = {"ce": [85.0, 85.2, 84.8], "kd": [87.0, 87.3, 86.7], "kd_std": [85.1, 84.9, 85.3],
        "fitnet": [85.0, 85.1, 84.9], "fitnet_fc": [84.9, 85.2, 85.0], "sp": [85.2, 84.7, 85.0],
        "simkd": [85.2, 86.2, 87.2], "semckd": [85.0, 85.4, 84.7], "featkd": [88.0, 88.2, 87.8],
        "featkd_ce": [86.0, 86.1, 85.9], "featkd_ce_kd": [89.5, 89.6, 89.4], "featkd_std": [87.9, 88.3, 87.6],
        "featkd_default": [88.1]}
LOW = {m: [a + 0.1 * i for a in NOISY] for i, m in enumerate(FULL) if m != "featkd_default"}


def method_entry(accs: list[float], params: int) -> dict:
    runs = [{"seed": seed, "finished": True, "epochs": 4, "final_test_acc": a / 100, "final_val_acc": a / 100 + 0.01,
             "best_val_epoch": 3, "best_val_acc": a / 100 + 0.02, "test_acc_at_best_val": (a - 0.5) / 100,
             "test_acc_per_epoch": [0.5, 0.7, (a - 0.5) / 100, a / 100],
             "val_acc_per_epoch": [0.5, 0.7, a / 100 + 0.02, a / 100 + 0.01], "train_time_s": 10.0}
            for seed, a in enumerate(accs)]
    return {"deployed_params": params, "runs": runs, "train_time_s": {"mean": 10.0, "std": 0.0, "n": len(accs)},
            "teacher_layers": [8, 9, 14, 15]}


def accuracy_file(regime: str, accs: dict[str, list[float]]) -> dict:
    methods = {m: method_entry(a, 12_345 + i) for i, (m, a) in enumerate(accs.items())}
    missing = [m for m in common.METHODS if m not in methods]
    return {
        "benchmark": "accuracy", "pair": PAIR, "regime": regime,
        "settings": {"scale": "synthetic-test", "data": "fashion_mnist", "regime": regime, "train_images": 5000,
                     "val_images": 5000, "teacher_regime": "full", "teacher": "resnet34", "teacher_width": 0.125,
                     "teacher_epochs": 30, "student": "resnet9", "student_width": 0.0625, "epochs": 4, "seeds": 3,
                     "batch_size": 128, "optimizer": "adamw", "augment": False, "teacher_outputs": "cached",
                     "quality_subset": 5000, "quality_variant": "paper"},
        "machine": {"cpu_model": "test CPU", "cpu_count": 2, "memory_gb": 8, "torch": "2", "cuda": None,
                    "torch_threads": 1, "workers": 2, "load_average": [0.5, 0.5, 0.5]},
        "command": f"python benchmarks/accuracy.py --regimes {regime}", "git_commit": "0123456789abcdef",
        "started": "2026-12-01T00:00:00+00:00", "finished": "2026-12-01T01:00:00+00:00",
        "teacher": {"name": "resnet34", "width": 0.125, "epochs": 30, "params": 1_234_567, "wall_s": 600.0,
                    "command": "featkd train-teacher --model resnet34", "run_dir": "teachers/resnet34",
                    "final_test_acc": {"mean": TEACHER_ACC, "std": None, "n": 1},
                    "final_val_acc": {"mean": 0.925, "std": None, "n": 1}},
        "layers": {"student": [1, 2, 3, 4], "standard": [3, 7, 13, 16], "q_selected": [8, 9, 14, 15],
                   "paper_q": {"cifar10": [12, 13, 14, 15]}, "q_seconds": 10.0},
        "train_images": 5000, "test_images": 10000, "complete": not missing, "missing": missing,
        "methods": methods,
    }


def convergence_file(regime: str, budget_val: float, long_val: float) -> dict:
    return {"pair": PAIR, "regime": regime, "seed": 0, "method": "ce", "budget_epochs": 4, "long_epochs": 8,
            "budget": {"final_val_acc": budget_val, "final_test_acc": 0.850},
            "long": {"final_val_acc": long_val, "final_test_acc": 0.848}, "command": "python benchmarks/accuracy.py"}


def write(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    write(folder, f"accuracy_{PAIR}_full.json", accuracy_file("full", FULL))
    write(folder, f"accuracy_{PAIR}_low.json", accuracy_file("low", LOW))
    write(folder, f"convergence_{PAIR}_full.json", convergence_file("full", 0.850, 0.853))  # +0.3: passes
    write(folder, f"convergence_{PAIR}_low.json", convergence_file("low", 0.850, 0.855))  # +0.5: fails
    return folder


def render(folder: Path, *argv: str) -> str:
    out = folder.parent / "BENCHMARKS.md"
    assert report.main(["--results", str(folder), "--out", str(out), *argv]) == 0
    return out.read_text()


def section(text: str, title: str) -> str:
    """The text from the heading ``title`` to the next heading."""
    start = text.index(title)
    ends = [i for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if i != -1]
    return text[start:min(ends) if ends else len(text)]


def row(text: str, first: str) -> list[str]:
    """The cells of the one table row of ``text`` that starts with ``first``."""
    found = [line for line in text.splitlines() if line.startswith(f"| {first} |")]
    assert len(found) == 1, f"{len(found)} rows start with {first!r}"
    return [cell.strip() for cell in found[0].strip("|").split("|")]


def welch_reference(a: list[float], b: list[float]) -> tuple[str, str, str]:
    """Difference, interval and p as the report writes them, computed by scipy alone."""
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    low, high = ref.confidence_interval(0.95)
    p = "<0.001" if ref.pvalue < 0.001 else f"{ref.pvalue:.3f}"
    return f"{np.mean(a) - np.mean(b):+.2f}", f"[{low:+.2f}, {high:+.2f}]", p


def test_cell_comparisons_give_the_right_verdicts_and_numbers(results):
    cell = section(render(results), f"### {PAIR}, full regime")
    expected = {("featkd", "ce"): "**better**", ("featkd", "kd"): "**better**",
                ("featkd", "featkd_ce"): "**better**", ("featkd", "featkd_std"): "no significant difference",
                ("featkd", "fitnet"): "**better**", ("featkd", "featkd_ce_kd"): "**worse**",
                ("featkd", "simkd"): "no significant difference"}
    for (a, b), verdict in expected.items():
        cells = row(cell, f"{a} vs {b}")
        p = scipy_stats.ttest_ind(FULL[a], FULL[b], equal_var=False).pvalue
        close = " (close: 3 vs 3 seeds, 5 wanted)" if 0.01 <= p <= 0.10 else ""
        assert cells[-1] == verdict + close, (a, b, cells)
        assert tuple(cells[2:5]) == welch_reference(FULL[a], FULL[b])
    assert row(cell, "featkd vs simkd")[-1].endswith("(close: 3 vs 3 seeds, 5 wanted)")  # p 0.084
    one_seed = row(cell, "featkd_default vs featkd")
    assert one_seed[4] == "n/a" and one_seed[-1].startswith("n/a (one seed")
    tie = row(cell, "featkd vs featkd_std")
    assert float(tie[5]) >= float(tie[4])  # Holm's p is never below the raw p


def test_method_table_gives_accuracy_params_best_val_and_difference_to_ce(results):
    cell = section(render(results), f"### {PAIR}, full regime")
    featkd = row(cell, "featkd")
    diff, ci, p = welch_reference(FULL["featkd"], FULL["ce"])
    assert featkd[1:8] == ["88.00 ± 0.20", "3", "12,353", "87.50 ± 0.20", f"{diff} {ci}", p, "10"]
    assert row(cell, "ce")[5:7] == ["—", "—"]
    assert row(cell, "featkd_default")[1:3] == ["88.10", "1"]


def test_sensitivity_flags_and_summary(results):
    text = render(results)
    assert "**Sensitive**: kd beats ce" in section(text, f"### {PAIR}, full regime")
    assert "Not sensitive: no baseline beats ce significantly" in section(text, f"### {PAIR}, low regime")
    summary = section(text, "## Summary")
    assert f"**Sensitive cells (1 of 2 judged)**: {PAIR} full (kd beat ce)." in summary
    assert "Not judged yet" not in summary
    assert "No cell is sensitive" not in summary
    assert "Verdicts over all 2 cells (a comparison counts in a cell once both its methods have run;" in summary
    every_cell, sensitive_cells = summary.split("The same over the 1 sensitive cell(s) only")
    # featkd vs ce: better in the full cell, no significant difference in the low cell
    assert row(every_cell, "featkd vs ce")[2:] == ["1", "1", "0", "0"]
    assert row(every_cell, "featkd vs featkd_ce_kd")[2:] == ["0", "1", "1", "0"]
    assert row(every_cell, "featkd_default vs featkd")[2:] == ["0", "0", "0", "1"]
    assert row(sensitive_cells, "featkd vs ce")[2:] == ["1", "0", "0", "0"]
    assert row(sensitive_cells, "featkd vs simkd")[2:] == ["0", "1", "0", "0"]
    low = [line for line in summary.splitlines() if line.startswith(f"| {PAIR} | low |")]
    assert len(low) == 1 and "| no |" in low[0] and "no significant difference" in low[0]
    assert "p-values are per comparison, not corrected" in summary
    # a better or worse verdict that does not survive Holm's correction within its cell is counted apart
    cell = section(text, f"### {PAIR}, full regime")
    for a, b in (("featkd", "kd"), ("featkd", "fitnet"), ("featkd", "featkd_ce_kd")):
        verdict, holm = row(cell, f"{a} vs {b}")[-1], float(row(cell, f"{a} vs {b}")[5].lstrip("<"))
        column = 2 if verdict.startswith("**better**") else 4
        counted = row(sensitive_cells, f"{a} vs {b}")[column]
        assert counted == ("1" if holm < 0.05 else "1 (0 after Holm)"), (a, b, holm, counted)


def test_verdict_counts_say_how_many_survive_holm():
    better = stats.welch([88.0, 88.1, 87.9], [85.0, 85.2, 84.8])
    worse = stats.welch([85.0, 85.2, 84.8], [88.0, 88.1, 87.9])
    unclear = stats.welch([85.0, 86.0, 84.0], [85.5, 86.4, 84.6])
    found = [(better, 0.001), (better, 0.2), (worse, 0.01), (unclear, 1.0)]
    assert report._count(found, "better") == "2 (1 after Holm)"
    assert report._count(found, "worse") == "1"
    assert report._count(found, "no significant difference") == "1" and report._count(found, "n/a") == "0"


def test_close_verdicts_on_too_few_seeds_are_listed_with_the_command_that_extends_them(results):
    summary = section(render(results), "## Summary")
    keys = [(a, b) for a, b, _ in report.COMPARISONS] + [(b, "ce") for b in report.BASELINES]
    close = {(a, b) for a, b in keys if len(FULL[a]) > 1
             and 0.01 <= scipy_stats.ttest_ind(FULL[a], FULL[b], equal_var=False).pvalue <= 0.10}
    assert ("featkd", "simkd") in close and ("featkd", "kd") in close  # p 0.084 and 0.012
    listed = [line for line in summary.splitlines() if line.startswith(f"- {PAIR} ")]
    assert len(listed) == 1, listed  # the low cell has no close verdict
    _, comparisons, command = listed[0].split(": ")
    assert {tuple(c.split(" vs ")) for c in comparisons.split(", ")} == close
    methods = command.split("--methods ")[1].split()[0].split(",")
    assert set(methods) == {m for key in close for m in key} and len(methods) == len(set(methods))
    expected = f"python benchmarks/accuracy.py --pairs {PAIR} --regimes full --methods {','.join(methods)} --seeds 5"
    assert command == f"`{expected}`"
    assert f"{len(close)} close verdicts are on fewer seeds so far" in summary


def test_close_extensions_come_cheapest_first_with_the_hours_their_missing_seeds_take():
    cells = {(PAIR, "full"): accuracy_file("full", FULL), (PAIR, "low"): accuracy_file("full", FULL)}
    for method in cells[(PAIR, "low")]["methods"].values():
        method["train_time_s"]["mean"] = 3.0  # the same close verdicts, but runs a third as long
    analysed = {key: report.analyse(d) for key, d in cells.items()}
    extensions = report.close_extensions(analysed, cells)
    assert [regime for _, regime, *_ in extensions] == ["low", "full"]
    for _, regime, close, seconds, _ in extensions:
        methods = {m for key in close for m in key}  # 3 seeds each, 2 missing
        assert seconds == pytest.approx(2 * len(methods) * (3.0 if regime == "low" else 10.0))
    listed = [line for line in report.close_verdict_lines(analysed, cells) if line.startswith("- ")]
    assert [line.split(" (about ")[0] for line in listed] == [f"- {PAIR} low", f"- {PAIR} full"]
    # featkd (in a close verdict) has a 4th seed in already: one run fewer to go
    cells[(PAIR, "full")]["unfinished"] = {"featkd": method_entry(FULL["featkd"] + [88.1], 12_345)}
    before = next(seconds for _, regime, _, seconds, _ in extensions if regime == "full")
    after = next(seconds for _, regime, _, seconds, _ in report.close_extensions(analysed, cells) if regime == "full")
    assert after == pytest.approx(before - 10.0)


def test_a_single_close_verdict_is_named_in_the_singular(monkeypatch):
    one = [(PAIR, "full", [("semckd", "ce")], 7200.0, "python benchmarks/accuracy.py --methods semckd,ce")]
    monkeypatch.setattr(report, "close_extensions", lambda analysed, cells: one)
    head, _, line, _ = report.close_verdict_lines({}, {})
    assert "1 close verdict is on fewer seeds so far; the command that extends it, cheapest first" in head
    assert line == f"- {PAIR} full (about 2.0 h of one core): semckd vs ce: `{one[0][4]}`"


def test_close_commands_option_prints_the_same_commands_and_writes_nothing(results, capsys):
    listed = [line.split(": ")[-1].strip("`") for line in section(render(results), "## Summary").splitlines()
              if line.startswith(f"- {PAIR} ")]
    written = (results.parent / "BENCHMARKS.md").read_text()
    (results.parent / "BENCHMARKS.md").unlink()
    capsys.readouterr()
    assert report.main(["--results", str(results), "--out", str(results.parent / "BENCHMARKS.md"),
                        "--close-commands"]) == 0
    assert capsys.readouterr().out.splitlines() == listed and listed and "--seeds 5" in written
    assert not (results.parent / "BENCHMARKS.md").exists()


def test_summary_says_plainly_when_no_cell_is_sensitive(results):
    (results / f"accuracy_{PAIR}_full.json").unlink()
    summary = section(render(results), "## Summary")
    assert "**No cell is sensitive**: in none of the 1 cells judged" in summary
    assert "Over sensitive cells only: none" in summary


def test_a_cell_without_baselines_is_not_judged_sensitive_or_not(results):
    no_baselines = {m: a for m, a in FULL.items() if m not in report.BASELINES}
    write(results, f"accuracy_{PAIR}_full.json", accuracy_file("full", no_baselines))
    text = render(results)
    assert "Sensitivity not known yet: no baseline was run." in section(text, f"### {PAIR}, full regime")
    summary = section(text, "## Summary")
    assert f"Not judged yet: {PAIR} full (0 of 7 baselines run)." in summary
    assert "**No cell is sensitive**: in none of the 1 cells judged" in summary
    full = [line for line in summary.splitlines() if line.startswith(f"| {PAIR} (partial) | full |")]
    assert len(full) == 1 and "| not known yet (0 of 7 baselines run) |" in full[0]


def test_a_cell_with_some_baselines_is_not_called_insensitive_until_all_have_run(results):
    """kd ties ce, the other baselines are missing: "not sensitive" would be premature."""
    partial = {m: a for m, a in LOW.items() if m not in report.BASELINES or m == "kd"}
    write(results, f"accuracy_{PAIR}_full.json", accuracy_file("full", partial))
    text = render(results)
    assert ("Sensitivity not known yet (1 of 7 baselines run, none beats ce so far; the largest difference: kd"
            in section(text, f"### {PAIR}, full regime"))
    summary = section(text, "## Summary")
    assert f"Not judged yet: {PAIR} full (1 of 7 baselines run, none beats ce so far)." in summary
    full = [line for line in summary.splitlines() if line.startswith(f"| {PAIR} (partial) | full |")]
    assert len(full) == 1 and "| not known yet (1 of 7 baselines run, none beats ce so far) |" in full[0]


def test_one_baseline_beating_ce_settles_sensitivity_before_the_others_run(results):
    partial = {m: a for m, a in FULL.items() if m not in report.BASELINES or m == "kd"}
    write(results, f"accuracy_{PAIR}_full.json", accuracy_file("full", partial))
    summary = section(render(results), "## Summary")
    assert "Not judged yet" not in summary
    assert f"**Sensitive cells (1 of 2 judged)**: {PAIR} full (kd beat ce)." in summary


def test_convergence_check_and_teacher_gaps(results):
    text = render(results)
    convergence = section(text, "## Convergence check")
    full = [line for line in convergence.splitlines() if line.startswith(f"| {PAIR} | full |")][0]
    low = [line for line in convergence.splitlines() if line.startswith(f"| {PAIR} | low |")][0]
    assert "| 85.00 → 85.30 | +0.30 |" in full and "| -0.20 |" in full and full.endswith("| converged |")
    assert "| +0.50 |" in low and low.endswith("| **not converged** |")
    assert f"1 of 2 cells pass; **not converged**: {PAIR} low." in section(text, "## Summary")
    assert "Earlier candidate budgets" not in convergence
    # a budget the check rejected is shown apart, and counts in no verdict
    write(results / report.REJECTED_BUDGETS, f"convergence_{PAIR}_full.json", convergence_file("full", 0.80, 0.82))
    text = render(results)
    rejected = section(text, "## Convergence check").split("Earlier candidate budgets")[1]
    assert f"| {PAIR} | full | 0 | 4 → 8 | 80.00 → 82.00 | +2.00 |" in rejected
    assert f"1 of 2 cells pass; **not converged**: {PAIR} low." in section(text, "## Summary")
    # a cell can reject several budgets in turn: each is listed, the shorter first
    second = {**convergence_file("full", 0.82, 0.84), "budget_epochs": 8, "long_epochs": 16}
    write(results / report.REJECTED_BUDGETS, f"convergence_{PAIR}_full_8.json", second)
    rejected = section(render(results), "## Convergence check").split("Earlier candidate budgets")[1]
    assert rejected.index("| 4 → 8 | 80.00 → 82.00 |") < rejected.index("| 8 → 16 | 82.00 → 84.00 |")
    teachers = section(text, "## Teachers")
    assert row(teachers, "resnet34 ×1/8")[1:6] == ["1,234,567", "30", "92.50", "92.00", "10"]
    gap = 100 * TEACHER_ACC - np.mean(FULL["ce"])
    assert f"| {PAIR} | full | 92.00 | 85.00 ± 0.20 (3) | {gap:.2f} |" in teachers


def test_cell_without_a_check_at_its_budget_is_named(results):
    # a rejected budget's check moved away, the new budget's not run yet
    (results / f"convergence_{PAIR}_low.json").rename(results / "rejected.json")
    summary = section(render(results), "## Summary")
    assert f"1 of 1 cells pass; **not checked** at their budget: {PAIR} low." in summary
    # a check of another budget than the cell trained does not count for it
    write(results, f"convergence_{PAIR}_low.json", {**convergence_file("low", 0.85, 0.85), "budget_epochs": 2})
    summary = section(render(results), "## Summary")
    assert f"1 of 1 cells pass; **not checked** at their budget: {PAIR} low." in summary


def test_a_cell_whose_ce_failed_says_so(results):
    data = accuracy_file("full", FULL)
    data["methods"]["ce"] = {"error": "out of memory", "runs": []}
    write(results, f"accuracy_{PAIR}_full.json", data)
    text = render(results)
    assert f"Not judged yet: {PAIR} full (ce has no finished run)" in section(text, "## Summary")
    cell = section(text, f"### {PAIR}, full regime")
    assert "Sensitivity not known yet: ce, the reference, has no finished run." in cell
    assert "ARI" not in cell


def test_damaged_files_are_named_and_left_out_instead_of_stopping_the_report(results, capsys):
    (results / f"accuracy_{PAIR}_low.json").write_text('{"pair": "x", "meth')      # cut off
    (results / "gpu").mkdir()
    (results / "gpu" / "gpu_check.json").write_text("{")
    (results / "extra").mkdir()
    (results / "extra" / "REPORT.md").write_text("# extra\n")
    (results / "extra" / "accuracy_a_b.json").write_text("[]")                  # no JSON object
    text = render(results)
    summary = section(text, "## Summary")
    assert "**Unreadable results files**, left out of every table (repair or move them): " in summary
    assert f"accuracy_{PAIR}_low.json`" in summary and "| resnet34-resnet9 | low |" not in summary
    assert "gpu/gpu_check.json` is not readable: repair or move it." in section(text, "## GPU check")
    assert "- [extra](" in section(text, "## Further checks")
    assert "is not valid JSON" in capsys.readouterr().err


def test_missing_and_failed_methods(results):
    data = accuracy_file("full", {m: a for m, a in FULL.items() if m != "semckd"})
    data["methods"]["sp"] = {"error": "out of memory", "runs": []}
    data["unfinished"] = {"semckd": {"runs": [data["methods"]["ce"]["runs"][0]]}}  # its seed 0 is done
    write(results, f"accuracy_{PAIR}_full.json", data)
    text = render(results)
    cell = section(text, f"### {PAIR}, full regime")
    assert "**partial**: missing semckd (1 of 3 seeds run)" in cell
    assert f"{PAIR} full (semckd (1 of 3 seeds run))" in text
    assert row(cell, "semckd")[1] == "missing" and row(cell, "sp")[1] == "failed: out of memory"
    assert row(cell, "featkd vs semckd")[2:] == ["not run", "—", "—", "—", "—"]
    assert row(cell, "featkd vs sp")[2] == "not run"
    assert "Holm p is over the 9 comparisons tested so far" in cell  # provisional until the cell is complete
    low = section(render(results), f"### {PAIR}, low regime")  # every row shows, featkd_default too
    assert row(low, "featkd_default")[1] == "missing"


def test_rows_getting_more_seeds_leave_the_cell_complete(results):
    data = accuracy_file("full", FULL)
    four = method_entry([*FULL["featkd"], 90.0], 12_345)  # seed 3 of 5 done: the table keeps the 3
    data["unfinished"] = {"featkd": four}
    data["commands"] = [data["command"], "python benchmarks/accuracy.py --methods featkd,kd --seeds 5"]
    write(results, f"accuracy_{PAIR}_full.json", data)
    text = render(results)
    cell = section(text, f"### {PAIR}, full regime")
    assert f"### {PAIR}, full regime (5000 training images, 5000 for validation) — complete" in cell
    assert "More seeds under way" in cell and "featkd (4 seeds run)" in cell
    assert "comparisons tested so far" not in cell  # complete: Holm over every comparison
    assert row(cell, "featkd")[2] == "3"
    data["unfinished"]["featkd"]["error"] = "RuntimeError: nan loss"  # the 5th seed failed: still kept
    write(results, f"accuracy_{PAIR}_full.json", data)
    cell = section(render(results), f"### {PAIR}, full regime")
    assert "featkd (4 seeds run; the next failed: RuntimeError: nan loss)" in cell and row(cell, "featkd")[2] == "3"
    files = section(text, "## Machine, commands and settings")
    assert ("`python benchmarks/accuracy.py --regimes full`, then "
            "`python benchmarks/accuracy.py --methods featkd,kd --seeds 5`") in files


def test_old_format_files_still_render(results):
    data = accuracy_file("low", LOW)
    for entry in data["methods"].values():
        del entry["deployed_params"]
        for run in entry["runs"]:
            for key in ("final_val_acc", "best_val_epoch", "best_val_acc", "test_acc_at_best_val",
                        "val_acc_per_epoch"):
                del run[key]
    write(results, f"accuracy_{PAIR}_low.json", data)
    cell = section(render(results), f"### {PAIR}, low regime")
    assert "Results file of the old format" in cell
    assert row(cell, "featkd")[1:5] == [f"{np.mean(LOW['featkd']):.2f} ± 1.00", "3", "—", "—"]
    assert row(cell, "featkd vs ce")[-1] == "no significant difference"
    assert "old format" not in section(render(results), f"### {PAIR}, full regime")


def test_bootstrap_option(results):
    text = render(results, "--test", "bootstrap")
    assert "studentized bootstrap" in section(text, "## Summary")
    cell = section(text, f"### {PAIR}, full regime")
    assert row(cell, "featkd vs ce")[-1] == "**better**"
    assert row(cell, "featkd vs featkd_std")[-1] == "no significant difference"


def test_budget_text_names_the_students_with_their_own_budget():
    def cell(student: str, epochs: int) -> dict:
        return {"settings": {"student": student, "epochs": epochs}}

    cells = {("a-resnet9", "full"): cell("resnet9", 15), ("b-vgg11_bn", "full"): cell("vgg11_bn", 15),
             ("c-vit_et", "full"): cell("vit_et", 30), ("c-vit_et", "low"): cell("vit_et", 160)}
    assert report.budget_text(cells, "full") == "15 student epochs (vit_et: 30)"
    assert report.budget_text(cells, "low") == "160 student epochs"


def test_probe_parts_show_the_hours_their_finished_methods_took():
    low = accuracy_file("low", {"ce": [80.0, 81.0], "kd": [82.0, 83.0]})
    low["methods"]["ce"]["wall_s"], low["methods"]["kd"]["wall_s"] = 3600.0, 1800.0
    stats = {"median": 1e-3, "min": 1e-3, "cpu": 1e-3}
    estimate = {"ce_wall_s": 60.0, "wall_s": 3600.0, "cpu_s": 7200.0, "workers": 2,
                "cells_cpu_s": {f"{PAIR} low": 7200.0, f"{PAIR} full": 36000.0}}
    probe = {"command": "python benchmarks/accuracy.py --probe", "batch_size": 128, "steps": 5,
             "machine": {"torch_threads": 1, "load_average": [0.1, 0.1, 0.1]}, "pairs": {PAIR: {"ce": stats}},
             "estimate": {"cpu": estimate}}
    text = "\n".join(report.section_probe({"probe": probe, "accuracy": {(PAIR, "low"): low}}))
    rows = len(common.rows())
    assert row(text, f"{PAIR} low") == [f"{PAIR} low", "2.0", f"2 of {rows}", "1.5"]
    assert row(text, f"{PAIR} full") == [f"{PAIR} full", "10.0", "0", "—"]
    assert "for the settings of commit" not in text
    assert "finished parts" not in text  # the low part has rows left to run
    low["unfinished"] = {"sp": {"runs": low["methods"]["ce"]["runs"][:2], "wall_s": 1800.0}}  # 2 seeds of sp
    text = "\n".join(report.section_probe({"probe": probe, "accuracy": {(PAIR, "low"): low}}))
    assert row(text, f"{PAIR} low")[2:] == [f"2 of {rows} (+ 2 seeds of 1 more)", "2.0"]
    # ce getting more seeds stays done; its entry carries the hour of its first two, counted once
    low["unfinished"] = {"ce": {"runs": low["methods"]["ce"]["runs"] * 2, "wall_s": 3600.0 + 1800.0}}
    text = "\n".join(report.section_probe({"probe": probe, "accuracy": {(PAIR, "low"): low}}))
    assert row(text, f"{PAIR} low")[2:] == [f"2 of {rows}", "2.0"]
    rows = len(common.rows())  # every row done, ce with 4 seeds: the finished part calibrates the estimate
    for method in common.rows():
        low["methods"].setdefault(method, {"runs": low["methods"]["kd"]["runs"], "wall_s": 1800.0})
    low["methods"]["ce"]["runs"] = low["methods"]["ce"]["runs"] * 2
    low["unfinished"] = {}
    probe["scale"] = {"seeds": 2}
    text = "\n".join(report.section_probe({"probe": probe, "accuracy": {(PAIR, "low"): low}}))
    hours, runs = 1.5 + 0.5 * (rows - 2), 2 * rows + 2
    scaled = hours * 2 * rows / runs
    assert (f"The 1 finished part took {scaled:.1f} h (scaled to 2 seeds a row) against 2.0 h "
            f"estimated from CPU times ({scaled / 2.0:.2f}×)") in text
    probe["re_estimated"] = {"git_commit": "0123456789abcdef", "at": "2026-11-30T23:00:00+00:00",
                             "command": "python benchmarks/accuracy.py --re-estimate"}
    text = "\n".join(report.section_probe({"probe": probe, "accuracy": {}}))
    assert ("for the settings of commit 0123456789ab (recomputed on 2026-11-30 with "
            "`python benchmarks/accuracy.py --re-estimate`; the timings are the probe's):") in text


def test_p_values_next_to_the_threshold_keep_the_side_they_fall_on():
    assert stats.format_p(0.0497) == "0.0497"
    assert stats.format_p(0.0503) == "0.0503"
    assert stats.format_p(0.04996) == "0.04996" and stats.format_p(0.05002) == "0.05002"  # either side of 0.05
    assert stats.format_p(0.05) == "0.050"
    assert stats.format_p(0.0123) == "0.012"
    assert stats.format_p(0.0004) == "<0.001"
    assert stats.format_p(None) == "n/a"


def test_seed_points_skip_non_finite_accuracies_as_the_stored_summaries_do():
    entry = method_entry([85.0, 86.0, 87.0], 1)
    entry["runs"][1]["final_test_acc"] = float("nan")
    assert report.seed_points(entry) == pytest.approx([85.0, 87.0])
    assert common.mean_std([r["final_test_acc"] for r in entry["runs"]])["n"] == 2


def fake_python(tmp_path, listing, unfinished=""):
    """An interpreter for the benchmark shell scripts: ``report.py --close-commands`` prints
    ``listing``; any other command is logged and then lists b and c; a command with
    ``unfinished`` in it exits 1, as accuracy.py does when it leaves rows unfinished."""
    log, fake = tmp_path / "log", tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = benchmarks/report.py ] && [ "$2" = --close-commands ]; then cat {listing}; exit 0; fi
echo "$*" >> {log}
printf '%s\\n' "{CLOSE.format('b')}" "{CLOSE.format('c')}" > {listing}
case "$*" in *"{unfinished or '@never@'}"*) exit 1;; esac
""")
    fake.chmod(0o755)
    return fake, log


CLOSE = "python benchmarks/accuracy.py --pairs {} --seeds 5"


def run_script(name, args, fake):
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    return subprocess.run([str(script), *args], env={**os.environ, "PYTHON": str(fake)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("unfinished", ["", "--pairs a "])
def test_extend_close_runs_each_listed_command_once_reading_the_list_again_after_each(tmp_path, unfinished):
    """benchmarks/extend_close.sh: the first run settles a and makes c close; b stays listed (as when
    its runs failed) and is not rerun. A command left unfinished does not stop the others."""
    listing = tmp_path / "listing"
    listing.write_text(f"{CLOSE.format('a')}\n{CLOSE.format('b')}\n")
    fake, log = fake_python(tmp_path, listing, unfinished)
    done = run_script("extend_close.sh", ["--workers", "1"], fake)
    assert done.returncode == (1 if unfinished else 0), done.stderr
    assert log.read_text().splitlines() == [CLOSE.format(p)[len("python "):] + " --workers 1" for p in "abc"]
    assert "every close verdict listed has had its command run" in done.stdout
    assert ("exit status 1 (left unfinished), going on" in done.stdout) == bool(unfinished)


@pytest.mark.parametrize("args", [[], ["--workers", "2"]])
def test_a_grid_worker_runs_every_cell_then_the_close_verdicts_seeds(tmp_path, args):
    """benchmarks/grid.sh: accuracy.py over every cell (one process and one thread by default), left
    unfinished here as when another worker holds a row, then extend_close.sh all the same."""
    listing = tmp_path / "listing"
    listing.write_text(f"{CLOSE.format('a')}\n")
    fake, log = fake_python(tmp_path, listing, unfinished="accuracy.py --w")
    done = run_script("grid.sh", args, fake)
    assert done.returncode == 1, done.stderr
    options = " ".join(args or ["--workers", "1", "--threads", "1"])
    # the grid's own run settled a and made c close, as a run of any command does here
    assert log.read_text().splitlines() == [f"benchmarks/accuracy.py {options}",
                                            *(CLOSE.format(p)[len("python "):] + f" {options}" for p in "bc")]
