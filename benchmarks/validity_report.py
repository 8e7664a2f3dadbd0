"""Statistics and the BENCHMARKS.md section of the layer-validity benchmark.

Reads ``layer_validity_<teacher>.json`` (written by ``layer_validity.py``) and,
per protocol ("deepest", "matched": one teacher layer; "sets": four):

* rho: Spearman's rank correlation between a predictor (the layer's score; a
  set's mean score) and the student's final validation accuracy (mean over
  seeds; the validation split is held out of the training data, so the rule
  chosen from these numbers is chosen without the test split),
  per teacher with a bootstrap 95 % CI (configurations resampled), pooled as
  the mean over teachers (stratified bootstrap). For sets, rho is taken over
  the random subsets only (the rule sets are not a random sample);
* regret: the accuracy of a rule's choice minus the best configuration's, in
  points (single layer: the rule's top layer; sets: the rule's set, and the
  baselines' standard layers for reference);
* against depth: Delta rho (paired bootstrap, one-sided p) and the accuracy of
  a rule's choice minus depth's choice, paired by teacher and seed (exact or
  Monte Carlo sign-flip test, one-sided p); a rule beats depth when its p,
  Holm-adjusted over the rules of the protocol, is below 0.05;
* the held-out check: the rule with the best mean regret on all teachers but
  one, and its regret (and depth's and the paper's Q's) on that one.

    python benchmarks/validity_report.py [--results DIR]     # prints the section
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from featkd.stats import holm

N_BOOT = 2000
ACCURACY = "final_val_acc"  # what every statistic ranks by: never the test split
SEED_ACCURACY = "val_seeds"
ALPHA = 0.05
SEED = 0
EXACT_FLIPS = 16  # sign-flip tests enumerate every flip up to this many pairs
MONTE_CARLO_FLIPS = 20000
DEPTH = "depth"
PAPER_Q = "Q/paper"
STANDARD = "standard"  # the baselines' evenly spread teacher layers, a fixed set
TEACHERS_NEEDED = 3  # the default rule is decided on three complete teachers, not fewer
PROTOCOL_TITLES = {
    "deepest": "One teacher layer into the student's deepest distilled layer",
    "matched": "One teacher layer into the student layer at the matching relative depth",
    "sets": "Sets of four teacher layers onto the student's paper layers (what `auto` chooses)",
}


# --------------------------------------------------------------------------- loading
def load(results: Path) -> dict[str, dict[str, Any]]:
    """{teacher: its results} from every layer_validity_<teacher>.json in ``results``."""
    found = {}
    for path in sorted(Path(results).glob("layer_validity_*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            print(f"validity_report.py: warning: {path} is not valid JSON ({err}); skipped", file=sys.stderr)
            continue
        if data.get("benchmark") == "layer_validity" and "teacher" in data:
            found[data["teacher"]] = data
    return found


@dataclass
class Configs:
    """The finished configurations of one protocol of one teacher."""

    layers: list[list[int]]  # teacher layers of each configuration
    accuracy: np.ndarray  # mean final validation accuracy over seeds (fraction)
    seeds: list[dict[str, float]]  # final validation accuracy per seed

    def __len__(self) -> int:
        return len(self.layers)

    def position(self, layers: list[int]) -> int | None:
        """Where the configuration with these teacher layers is (None: not run or not finished)."""
        return self.layers.index(sorted(layers)) if sorted(layers) in self.layers else None


def configs(data: dict[str, Any], protocol: str, only: list[list[int]] | None = None) -> Configs:
    """The protocol's finished configurations (those whose teacher layers are in ``only`` when given)."""
    rows = [data["runs"][key] for key in data["protocols"].get(protocol, []) if key in data["runs"]]
    rows = [r for r in rows if (r.get(ACCURACY) or {}).get("mean") is not None]
    if only is not None:
        rows = [r for r in rows if sorted(r["teacher_layers"]) in [sorted(s) for s in only]]
    return Configs([sorted(r["teacher_layers"]) for r in rows],
                   np.array([r[ACCURACY]["mean"] for r in rows], dtype=float),
                   [r[SEED_ACCURACY] for r in rows])


def scores(data: dict[str, Any], predictor: str, layers: list[list[int]]) -> np.ndarray:
    """A predictor's value for each configuration: the mean over its teacher layers."""
    values = data["predictors"][predictor]
    return np.array([np.mean([values[str(t)] for t in ls]) for ls in layers], dtype=float)


# --------------------------------------------------------------------------- statistics
def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row pair of x and y (B, n), ties averaged; NaN where undefined."""
    rx = rankdata(x, axis=-1)
    ry = rankdata(y, axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


def resamples(n: int, rng: np.random.Generator, n_boot: int = N_BOOT) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement."""
    return rng.integers(0, n, size=(n_boot, n))


def rank_correlations(data: dict[str, Any], protocol: str, predictors: list[str], rng: np.random.Generator,
                      n_boot: int = N_BOOT) -> dict[str, dict[str, Any]] | None:
    """{predictor: {"rho", "boot"}} on one teacher's protocol (same resamples for every predictor),
    or None with fewer than 3 configurations."""
    only = data.get("random_sets") if protocol == "sets" else None
    found = configs(data, protocol, only)
    if len(found) < 3:
        return None
    index = resamples(len(found), rng, n_boot)
    out = {}
    for pid in predictors:
        x = scores(data, pid, found.layers)
        out[pid] = {"rho": float(spearman_rows(x, found.accuracy)),
                    "boot": spearman_rows(x[index], found.accuracy[index]), "n": len(found)}
    return out


def interval(boot: np.ndarray) -> tuple[float | None, float | None]:
    """The 95 % percentile interval of the defined bootstrap values."""
    kept = boot[~np.isnan(boot)]
    if not len(kept):
        return None, None
    return float(np.percentile(kept, 2.5)), float(np.percentile(kept, 97.5))


def above_p(diffs: np.ndarray) -> float | None:
    """One-sided bootstrap p of "greater than 0": the share of defined replicates <= 0."""
    kept = diffs[~np.isnan(diffs)]
    return float((kept <= 0).mean()) if len(kept) else None


def sign_flip_p(differences: list[float], rng: np.random.Generator) -> float | None:
    """One-sided p of a paired sign-flip test that the mean difference is > 0."""
    d = np.asarray(differences, dtype=float)
    if not len(d):
        return None
    observed = d.mean()
    if len(d) <= EXACT_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        signs = np.vstack([np.ones(len(d)), rng.choice((1.0, -1.0), size=(MONTE_CARLO_FLIPS, len(d)))])
    return float(((signs * d).mean(1) >= observed - 1e-12).mean())


def choice(data: dict[str, Any], protocol: str, rule: str, found: Configs) -> int | None:
    """Position in ``found`` of the configuration ``rule`` chooses (None when not finished)."""
    if protocol == "sets":
        layers = data.get("standard_set") if rule == STANDARD else data["rule_sets"].get(rule)
        return found.position(layers) if layers is not None else None
    if rule not in data["predictors"]:
        return None  # a set-building rule: one layer has no bands
    values = scores(data, rule, found.layers)
    ranked = sorted(range(len(found)), key=lambda i: (-math.inf if math.isnan(values[i]) else values[i],
                                                      found.layers[i][0]))
    return ranked[-1] if ranked else None


def regrets(data: dict[str, Any], protocol: str, rules: list[str]) -> dict[str, dict[str, Any]]:
    """{rule: {"regret" (points, <= 0), "layers", "seeds"}} for the rules whose choice has finished."""
    found = configs(data, protocol)
    if not len(found):
        return {}
    best = float(found.accuracy.max())
    out = {}
    for rule in rules:
        at = choice(data, protocol, rule, found)
        if at is not None:
            out[rule] = {"regret": 100 * (float(found.accuracy[at]) - best), "layers": found.layers[at],
                         "seeds": found.seeds[at]}
    return out


# --------------------------------------------------------------------------- the analysis
def rules_of(teachers: dict[str, dict[str, Any]], protocol: str) -> list[str]:
    """The rules to compare in a protocol, in the results' order (set-building ones only for sets,
    with the baselines' standard layers as one more when every teacher has them)."""
    first = next(iter(teachers.values()))
    rules = list(first["rule_sets"]) if protocol == "sets" else list(first["predictors"])
    rules = [r for r in rules if all(r in (d["rule_sets"] if protocol == "sets" else d["predictors"])
                                     for d in teachers.values())]
    if protocol == "sets" and all(d.get("standard_set") for d in teachers.values()):
        rules.append(STANDARD)
    return rules


def analyse(teachers: dict[str, dict[str, Any]], n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, Any]:
    """Every statistic of the section, per protocol: rho, regret, tests against depth, held-out check."""
    rng = np.random.default_rng(seed)
    predictors = [p for p in next(iter(teachers.values()))["predictors"]
                  if all(p in d["predictors"] for d in teachers.values())]
    out: dict[str, Any] = {}
    for protocol in PROTOCOL_TITLES:
        rules = rules_of(teachers, protocol)
        ranking = {t: rank_correlations(d, protocol, predictors, rng, n_boot) for t, d in teachers.items()}
        ranking = {t: r for t, r in ranking.items() if r is not None}
        choices = {t: regrets(d, protocol, rules) for t, d in teachers.items()}
        out[protocol] = {
            "rho": _rho_table(ranking, predictors),
            "regret": {rule: {t: c[rule] for t, c in choices.items() if rule in c} for rule in rules},
            "vs_depth": _against_depth(choices, rules, rng),
            "held_out": held_out(choices, rules),
        }
    return out


def _rho_table(ranking: dict[str, dict[str, Any]], predictors: list[str]) -> dict[str, Any]:
    """Per predictor: per-teacher rho and CI, the pooled mean with its stratified CI, Delta rho vs depth."""
    table = {}
    for pid in predictors:
        row: dict[str, Any] = {"teachers": {}}
        for teacher, r in ranking.items():
            low, high = interval(r[pid]["boot"])
            row["teachers"][teacher] = {"rho": r[pid]["rho"], "low": low, "high": high, "n": r[pid]["n"]}
        if ranking:
            pooled_boot = np.mean([r[pid]["boot"] for r in ranking.values()], axis=0)
            rhos = [r[pid]["rho"] for r in ranking.values()]
            row["pooled"] = {"rho": float(np.mean(rhos)) if not np.isnan(rhos).any() else None,
                             **dict(zip(("low", "high"), interval(pooled_boot)))}
            if pid != DEPTH and DEPTH in predictors:
                diff = pooled_boot - np.mean([r[DEPTH]["boot"] for r in ranking.values()], axis=0)
                depth_rho = np.mean([r[DEPTH]["rho"] for r in ranking.values()])
                row["vs_depth"] = {"diff": float(np.mean(rhos) - depth_rho), "p": above_p(diff)}
        table[pid] = row
    return table


def _against_depth(choices: dict[str, dict[str, Any]], rules: list[str], rng: np.random.Generator
                   ) -> dict[str, dict[str, Any]]:
    """Per rule: its choice's accuracy minus depth's choice's, paired by teacher and seed (points)."""
    out = {}
    for rule in rules:
        if rule == DEPTH:
            continue
        pairs = []
        for c in choices.values():
            if rule in c and DEPTH in c:
                mine, depth = c[rule]["seeds"], c[DEPTH]["seeds"]
                pairs += [100 * (mine[s] - depth[s]) for s in sorted(set(mine) & set(depth))]
        if pairs:
            out[rule] = {"diff": float(np.mean(pairs)), "p": sign_flip_p(pairs, rng), "pairs": len(pairs)}
    return out


def held_out(choices: dict[str, dict[str, Any]], rules: list[str]) -> list[dict[str, Any]]:
    """For each teacher: the rule with the best mean regret on the others, and how it does on it
    (the baselines' fixed standard set is not a rule a new teacher could be given, so it is left out)."""
    rules = [r for r in rules if r != STANDARD]
    teachers = [t for t, c in choices.items() if c]
    if len(teachers) < 2:
        return []
    rows = []
    for held in teachers:
        others = [t for t in teachers if t != held]
        scored = [(np.mean([choices[t][r]["regret"] for t in others]), -i, r) for i, r in enumerate(rules)
                  if all(r in choices[t] for t in others)]
        if not scored:
            continue
        mean_regret, _, winner = max(scored)  # ties: the rule listed first
        rows.append({"held_out": held, "chosen_on": others, "winner": winner,
                     "winner_regret_on_others": float(mean_regret),
                     "winner_regret": choices[held].get(winner, {}).get("regret"),
                     "depth_regret": choices[held].get(DEPTH, {}).get("regret"),
                     "paper_q_regret": choices[held].get(PAPER_Q, {}).get("regret")})
    return rows


def default_verdict(teachers: dict[str, dict[str, Any]], analysis: dict[str, Any]) -> dict[str, Any]:
    """The rule ``auto`` should use, by the criterion fixed before the results were in.

    Depth (the deepest four) is the default unless rules beat depth's choice in
    the sets protocol (what ``auto`` does): paired sign-flip test over teachers
    and seeds, Holm-adjusted over the protocol's rules, p < ALPHA. Among those,
    the one with the best mean regret. Decided only with TEACHERS_NEEDED
    complete teachers; ``floor`` is the smallest Holm-adjusted p the pairs allow.
    """
    complete = sorted(t for t, d in teachers.items() if d.get("complete"))
    tests = rule_tests(analysis["sets"]["vs_depth"])
    pairs = max((t["pairs"] for t in tests.values()), default=0)
    floor = min(1.0, len(tests) / 2 ** pairs) if pairs and pairs <= EXACT_FLIPS else None
    verdict: dict[str, Any] = {"complete": complete, "rules": len(tests), "pairs": pairs, "floor": floor}
    if len(complete) < TEACHERS_NEEDED:
        return {**verdict, "rule": None, "beat_depth": []}
    winners = beating(tests, lambda test: test["p"])
    regret = analysis["sets"]["regret"]
    mean = {r: float(np.mean([c["regret"] for c in regret[r].values()])) for r in winners}
    return {**verdict, "rule": max(winners, key=lambda r: mean[r]) if winners else DEPTH, "beat_depth": winners}


def _verdict_lines(verdict: dict[str, Any]) -> list[str]:
    from featkd.selection import DEFAULT_RULE, measure_variant, parse_rule

    lines = ["### The default rule", "",
             f"Criterion, fixed before the results: depth (the deepest four candidate layers) unless rules beat "
             f"depth's choice of four in the sets protocol (Holm-adjusted p < {ALPHA}); then the one of them with "
             f"the best mean regret. Decided on {TEACHERS_NEEDED} complete teachers.", ""]
    floor = verdict["floor"]
    if floor is not None:
        lines += [f"With {verdict['pairs']} (teacher, seed) pairs and {verdict['rules']} rules, the smallest "
                  f"Holm-adjusted p attainable is {floor:.3g}"
                  + (": no rule can beat depth at this number of seeds." if floor >= ALPHA else ".")]
    if verdict["rule"] is None:
        lines.append(f"**Undecided**: {len(verdict['complete'])} of {TEACHERS_NEEDED} teachers complete "
                     f"({', '.join(verdict['complete']) or 'none'}). featkd's `DEFAULT_RULE` is `{DEFAULT_RULE}`.")
    else:
        default = parse_rule(DEFAULT_RULE).in_variant(measure_variant(DEFAULT_RULE)).name  # as the results name it
        agrees = "matches" if verdict["rule"] == default else "**does not match**"
        beating = ", ".join(verdict["beat_depth"]) or "none"
        lines.append(f"Verdict: **{verdict['rule']}** (rules beating depth: {beating}); "
                     f"featkd's `DEFAULT_RULE` (`{DEFAULT_RULE}`) {agrees} it.")
    return lines + [""]


# --------------------------------------------------------------------------- Markdown
def _signed(value: float | None, fmt: str = "+.2f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _rho_cell(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("rho") is None:
        return "—"
    ci = f" [{_signed(cell['low'])}, {_signed(cell['high'])}]" if cell.get("low") is not None else ""
    return f"{_signed(cell['rho'])}{ci}"


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}"
    return f"**{text}**" if value < ALPHA else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(row) + " |" for row in rows]


def _layers(layers: list[int]) -> str:
    return f"GL {layers[0]}" if len(layers) == 1 else "[" + ", ".join(map(str, layers)) + "]"


def _setup(teachers: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for teacher, d in teachers.items():
        s, run = d["settings"], d.get("teacher_run", {})
        done = len(d["runs"])
        total = done + len(d.get("missing", []))
        acc = run.get("final_test_acc") or {}
        acc_text = f", test accuracy {100 * acc['mean']:.2f} %" if acc.get("mean") is not None else ""
        state = "complete" if d.get("complete") else f"**partial**: {done} of {total} configurations"
        lines.append(f"- {d['pair']}: teacher width {run.get('width', '?')}{acc_text}; {len(d['candidate_layers'])} "
                     f"candidate GLs {d['candidate_layers'][0]}–{d['candidate_layers'][-1]}, "
                     f"{len(d['random_sets'])} random sets; {s['regime']} regime ({s['train_images']} images), "
                     f"{s['epochs']} epochs, {s['seeds']} seeds ({s.get('rule_seeds', s['seeds'])} for the sets "
                     f"the rules choose); {state}.")
    return lines


def _protocol_lines(protocol: str, result: dict[str, Any], teachers: list[str]) -> list[str]:
    lines = [f"### {PROTOCOL_TITLES[protocol]}", ""]
    rho = result["rho"]
    if rho and any(row["teachers"] for row in rho.values()):
        subject = "random sets (a set's score: the mean over its layers)" if protocol == "sets" else "layers"
        lines += [f"Spearman ρ between the predictor and the student's final validation accuracy over the {subject}, "
                  f"with a bootstrap 95 % CI; pooled: the mean over teachers; Δρ vs depth with a one-sided "
                  f"paired-bootstrap p (unadjusted):", ""]
        rows = [[pid] + [_rho_cell(row["teachers"].get(t)) for t in teachers] + [_rho_cell(row.get("pooled"))]
                + [f"{_signed(row['vs_depth']['diff'])} (p {_p(row['vs_depth']['p'])})" if "vs_depth" in row else "—"]
                for pid, row in rho.items()]
        lines += _table(["predictor"] + teachers + ["pooled", "Δρ vs depth"], rows) + [""]
    regret, vs_depth = result["regret"], result["vs_depth"]
    if any(regret.values()):
        lines += ["Regret: the accuracy of the rule's choice minus the best configuration's (points); vs depth: "
                  "its choice minus depth's choice, paired by teacher and seed, with a one-sided sign-flip p "
                  "and the p Holm-adjusted over the rules (the fixed standard set is not one of them):", ""]
        adjusted = holm_adjusted(rule_tests(vs_depth), lambda test: test["p"])
        rows = []
        for rule, cells in regret.items():
            mean = np.mean([c["regret"] for c in cells.values()]) if len(cells) == len(teachers) else None
            test = vs_depth.get(rule)
            holm_p = f"Holm {_p(adjusted[rule])}, " if rule in adjusted else ""
            rows.append([rule] + [f"{_signed(cells[t]['regret'])} ({_layers(cells[t]['layers'])})" if t in cells
                                  else "—" for t in teachers] + [_signed(mean)]
                        + [f"{_signed(test['diff'])} (p {_p(test['p'])}, {holm_p}{test['pairs']} pairs)"
                           if test else "—"])
        lines += _table(["rule"] + teachers + ["mean", "vs depth's choice"], rows) + [""]
    beat_rank = beating(rho, lambda row: row.get("vs_depth", {}).get("p"))
    beat_choice = beating(rule_tests(vs_depth), lambda test: test["p"])
    lines.append(f"Beat depth (Holm-adjusted p < {ALPHA} over the rules above): in ranking — "
                 f"{', '.join(beat_rank) or 'none'}; in the choice — {', '.join(beat_choice) or 'none'}.")
    return lines + [""]


def rule_tests(vs_depth: dict[str, Any]) -> dict[str, Any]:
    """The tests against depth of the rules (the baselines' fixed standard set left out)."""
    return {rule: test for rule, test in vs_depth.items() if rule != STANDARD}


def holm_adjusted(table: dict[str, Any], p_of: Any) -> dict[str, float | None]:
    """{name: its one-sided p, Holm-adjusted over the table's rows}."""
    names = list(table)
    return dict(zip(names, holm([p_of(table[name]) for name in names])))


def beating(table: dict[str, Any], p_of: Any) -> list[str]:
    """The names whose one-sided p, Holm-adjusted over the table's rows, is below ALPHA."""
    return [name for name, p in holm_adjusted(table, p_of).items() if p is not None and p < ALPHA]


def _held_out_lines(analysis: dict[str, Any]) -> list[str]:
    lines = ["### Held-out check", "",
             "The rule with the best mean regret on all teachers but one, and its regret on that one "
             "(points; depth's and the paper's Q's beside it):", ""]
    rows = []
    for protocol in PROTOCOL_TITLES:
        for r in analysis[protocol]["held_out"]:
            rows.append([protocol, r["held_out"], f"{r['winner']} ({_signed(r['winner_regret_on_others'])} on "
                         f"{', '.join(r['chosen_on'])})", _signed(r["winner_regret"]), _signed(r["depth_regret"]),
                         _signed(r["paper_q_regret"])])
    if not rows:
        return lines[:2] + ["Needs finished results for at least two teachers.", ""]
    return lines + _table(["protocol", "held-out teacher", "winner on the others", "its regret",
                           "depth's regret", "Q (paper)'s regret"], rows) + [""]


def markdown(results: Path, n_boot: int = N_BOOT, seed: int = SEED) -> str:
    """The BENCHMARKS.md section of the layer-validity benchmark from the files in ``results``."""
    return report(results, n_boot, seed)[0]


def summary_line(verdict: dict[str, Any], held: list[dict[str, Any]] = ()) -> str:
    """One line for the summary of BENCHMARKS.md: where the choice of the default rule stands, and
    how the sets protocol's held-out check (``held``) came out."""
    from featkd.selection import DEFAULT_RULE

    if verdict["rule"] is None:
        return (f"Default teacher-layer rule: **undecided** ({len(verdict['complete'])} of {TEACHERS_NEEDED} "
                f"layer-validity teachers complete); `auto` uses `{DEFAULT_RULE}` until then.")
    beat = ", ".join(verdict["beat_depth"]) or "none"
    return (f"Default teacher-layer rule: **{verdict['rule']}** by the criterion fixed in advance (rules beating "
            f"depth: {beat}); `auto` uses `{DEFAULT_RULE}`." + _held_out_summary(held))


def _held_out_summary(held: list[dict[str, Any]]) -> str:
    rows = [r for r in held if r["winner_regret"] is not None and r["depth_regret"] is not None]
    if not rows:
        return ""
    better = sum(r["winner_regret"] > r["depth_regret"] for r in rows)
    gaps = ", ".join(f"{r['held_out']} {r['winner']} {r['winner_regret'] - r['depth_regret']:+.2f}" for r in rows)
    return (f" Held-out check (the rule with the best mean regret on the other teachers, judged on the one left "
            f"out, against depth's choice): better on {better} of {len(rows)} teachers ({gaps} points).")


def report(results: Path, n_boot: int = N_BOOT, seed: int = SEED) -> tuple[str, str | None]:
    """The section's Markdown and the summary line (None without results), from one analysis."""
    title = "## Which rule picks the teacher layers? (`benchmarks/layer_validity.py`)"
    teachers = load(results)
    if not teachers:
        return "\n".join([title, "", "No results yet: run `python benchmarks/layer_validity.py` "
                                     "(three teachers; see benchmarks/README.md).", ""]) + "\n", None
    analysis = analyse(teachers, n_boot, seed)
    verdict = default_verdict(teachers, analysis)
    first = next(iter(teachers.values()))
    lines = [title, "",
             "featkd distilled from single teacher layers and from sets of four, on each teacher's training "
             "split. Knowledge quality was measured, in both variants, on a class-balanced subset of "
             f"{first['settings']['quality_subset']} training images; the probe: "
             f"{first.get('probe') or 'a ridge classifier on pooled features'}. The probe is scored on the "
             "validation split, as in `auto`, and the same split judges the configurations, which can only "
             "favour the probe rule. A rule's set is its top 4 "
             "by the score, or with `bands:` the best layer in each of 4 equal depth bands.", ""]
    lines += _setup(teachers) + [""]
    names = list(teachers)
    for protocol in PROTOCOL_TITLES:
        lines += _protocol_lines(protocol, analysis[protocol], names)
    lines += _held_out_lines(analysis)
    lines += _verdict_lines(verdict)
    return "\n".join(lines).rstrip() + "\n", summary_line(verdict, analysis["sets"]["held_out"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    print(markdown(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
