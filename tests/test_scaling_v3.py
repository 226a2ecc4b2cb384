"""Scaling study v3: two families under one design, two rounds, leave-one-out with seed twins.
Fabricated sweeps of known laws: the comparison recovers each family's law, which family is lower
at equal compute and the crossover number of generated images, and its intervals cover the truth;
the second-round planner puts the known optimum inside each level's sizes."""

import json

import numpy as np
import pytest

from scaling.collect import ScalingError
from scaling.compare import compare, cost_to_loss, crossover, family_costs, optimal_loss
from scaling.fit import LawFit, compute_optimal, fit_law
from scaling.holdout import leave_one_out, twin_group
from scaling.plan import family_studies, family_study, load_study, plan_study, study_sizes
from test_scaling_plan import SIZES, seconds, study_file

KEY = "val_loss_r0.7"
# Two families with the same training FLOPs per parameter-sample but different laws and sampling
# costs: "fast" samples at a tenth of "base"'s FLOPs per image and reaches a given loss with more
# training compute (a larger A), so base is cheaper for training and fast wins from some M on.
TRUE = {"fast": LawFit(E=1.2, A=60.0, B=900.0, alpha=0.35, beta=0.42),
        "base": LawFit(E=1.2, A=40.0, B=900.0, alpha=0.35, beta=0.42)}
SAMPLE = {"fast": 0.4, "base": 4.0}  # sampling FLOPs per image, in units of 6 N
SIZES_N = np.geomspace(2e4, 2e6, 6)
BUDGETS = np.geomspace(1e11, 1.6e12, 5)


def fabricate(fam: str, noise: float = 0.0, seed: int = 0):
    """Runs and final points of an isoFLOP sweep whose losses follow TRUE[fam] (times log-normal
    noise): each size at each budget, D = C / (6 N)."""
    rng = np.random.default_rng(seed)
    runs, points = [], []
    for n in SIZES_N:
        for j, c in enumerate(BUDGETS):
            d = c / (6 * n)
            name = f"{fam}-n{int(n)}-c{j}"
            loss = float(TRUE[fam].predict(n, d)) * float(np.exp(rng.normal(0, noise)))
            runs.append({"run": name, "n_params_nonembed": float(n), "flops_per_sample": 6 * n,
                         "sample_flops_reuse": SAMPLE[fam] * 6 * n if fam == "fast" else None,
                         "sample_flops_plain": 10 * 6 * n if fam == "fast" else SAMPLE[fam] * 6 * n,
                         "compute": c, "sample_steps": 8})
            points.append({"run": name, "n_params_nonembed": float(n), "samples": d, KEY: loss})
    return runs, points


def fitted_family(fam, noise=0.0, seed=0, bootstrap=0):
    runs, pts = fabricate(fam, noise, seed)
    fit = fit_law([p["n_params_nonembed"] for p in pts], [p["samples"] for p in pts], [p[KEY] for p in pts],
                  [p["run"] for p in pts], bootstrap=bootstrap, seed=seed)
    return {"fit": fit, "runs": runs, "points": pts}


def truth(budgets):
    """The comparison's numbers from the true laws and the true cost curves."""
    fams = {f: {"fit": TRUE[f], "runs": fabricate(f)[0]} for f in TRUE}
    return compare(fams, budgets=budgets)


@pytest.mark.slow
def test_two_families_are_recovered_with_their_ordering_and_crossover():
    budgets = {"big": 1e15}
    want = truth(budgets)
    got = compare({f: fitted_family(f) for f in ("fast", "base")}, budgets=budgets)
    for f in TRUE:  # noiseless points: each law to the precision the search claims
        for k in ("alpha", "beta"):
            assert got["laws"][f][k] == pytest.approx(getattr(TRUE[f], k), abs=2e-3)
        assert got["laws"][f]["E"] == pytest.approx(TRUE[f].E, rel=1e-2)
        assert got["laws"][f]["sampling"] == ("reuse" if f == "fast" else "no reuse")
    # Equal training compute: base is lower everywhere (its A is smaller, the costs are equal).
    for g, w in zip(got["equal_compute"], want["equal_compute"]):
        assert g["lower"] == w["lower"] == "base"
        assert g["fast"] == pytest.approx(w["fast"], rel=2e-3) and g["base"] == pytest.approx(w["base"], rel=2e-3)
    assert [r["studied_range"] for r in got["equal_compute"]] == [True] * 4 + [False]
    # The crossover: fast costs more to train to the target, samples 10x cheaper.
    m = want["crossover"]["M"]
    assert 0 < m < np.inf
    assert got["crossover"]["M"] == pytest.approx(m, rel=0.05)
    # At the crossover the two totals are equal (the definition, checked against cost_to_loss).
    costs = {f: family_costs(fabricate(f)[0]) for f in TRUE}
    loss = want["crossover"]["loss"]
    assert cost_to_loss(TRUE["fast"], costs["fast"], loss, m)[0] == pytest.approx(
        cost_to_loss(TRUE["base"], costs["base"], loss, m)[0], rel=1e-6)
    # Below it base is the cheaper, above it fast.
    assert cost_to_loss(TRUE["fast"], costs["fast"], loss, m / 3)[0] > cost_to_loss(TRUE["base"], costs["base"], loss, m / 3)[0]
    assert cost_to_loss(TRUE["fast"], costs["fast"], loss, m * 3)[0] < cost_to_loss(TRUE["base"], costs["base"], loss, m * 3)[0]


def test_crossover_is_zero_when_the_cheaper_sampler_also_trains_cheaper():
    costs = {f: family_costs(fabricate(f)[0]) for f in TRUE}
    loss = optimal_loss(TRUE["fast"], costs["fast"]["f"], 1e12, costs["fast"]["n_range"])[0]
    # base (the smaller A) as the family with the cheaper sampling: cheaper at M = 0 already.
    assert crossover(TRUE["base"], costs["fast"], TRUE["fast"], costs["base"], loss) == 0.0
    # Equal sampling costs and a dearer training: never.
    assert crossover(TRUE["fast"], costs["base"], TRUE["base"], costs["base"], loss) == np.inf
    # A loss below E cannot be reached: NaN, not a number.
    assert np.isnan(crossover(TRUE["fast"], costs["fast"], TRUE["base"], costs["base"], 1.0))


@pytest.mark.slow
def test_comparison_intervals_cover_the_truth():
    """0.5 % noise on every loss, 40 bootstrap resamples per family, three noise draws: the 95 %
    intervals of each family's exponents, the losses at equal compute, their difference and the
    crossover contain the true values in most cases (a percentile bootstrap over 30 runs covers a
    little less than 95 %), the crossover in every one. Intervals of zero width, or of the point
    estimate only, cover almost never."""
    budgets = {"big": 1e14}
    want = truth(budgets)
    covered, cases = 0, 0
    for seeds in ((1, 2), (3, 4), (5, 6)):
        fams = {f: fitted_family(f, noise=0.005, seed=s, bootstrap=40) for f, s in zip(("fast", "base"), seeds)}
        got = compare(fams, budgets=budgets)
        assert got["pairs"] == 40
        checks = []
        for f in TRUE:
            checks += [(got["laws"][f]["ci"][k], getattr(TRUE[f], k)) for k in ("alpha", "beta")]
            checks.append((got["laws"][f]["a_ci"], TRUE[f].beta / (TRUE[f].alpha + TRUE[f].beta)))
        for g, w in zip(got["equal_compute"], want["equal_compute"]):
            checks += [(g[f"{f}_ci"], w[f]) for f in TRUE] + [(g["difference_ci"], w["difference"])]
        covered += sum(lo <= t <= hi for (lo, hi), t in checks)
        cases += len(checks)
        lo, hi = got["crossover"]["ci"]
        assert lo <= want["crossover"]["M"] <= hi and lo < hi, (seeds, lo, hi, want["crossover"]["M"])
    assert covered >= 0.85 * cases, (covered, cases)


def test_compare_needs_two_families():
    with pytest.raises(ScalingError, match="two families"):
        compare({"fast": {"fit": TRUE["fast"], "runs": fabricate("fast")[0]}}, budgets={})


# --- the second round ----------------------------------------------------------------------------


def test_second_round_puts_the_known_optimum_inside_its_sizes(tmp_path):
    """Round 2 from a fit whose optimum runs along the ladder: its levels lie between round 1's
    (x sqrt 2), every level's sizes bracket the law's N*(C), no seed repeats, and the hold-out lies
    >= 3x C beyond round 2's top level and >= 2x N beyond every fitted size."""
    study = load_study(study_file(tmp_path, rounds=2))
    sizes = study_sizes(study)
    lrs = {n: 2e-3 for n in sizes}
    first = plan_study(study, lrs, seconds(sizes), sizes, images=10 ** 8, parallel=2)
    assert first["round"] == 1 and first["holdout"] == []  # the hold-out waits for the last round
    assert len([r for r in first["fit"] if "seed" in r]) == 6
    # A known law whose N* at round 2's levels lies among the ladder's middle sizes.
    law = LawFit(E=1.5, A=30.0, B=2000.0, alpha=0.3, beta=0.45)
    k = 60.0
    levels2 = [c * 2 ** 0.5 for c in first["levels"]]
    ns = [sizes[n]["N"] for n in sizes if 2 * sizes[n]["N"] <= sizes["w192"]["N"]]
    # Scale the law's G so that N* at the middle of round 2 is the geometric middle of the sizes.
    mid = np.sqrt(levels2[1] * levels2[2])
    target = float(np.exp(np.mean(np.log(ns))))
    n_mid = float(compute_optimal(law, k, mid)["N"])
    law.A *= (target / n_mid) ** (law.alpha + law.beta)
    fit = {"law": law.as_dict(), "k_flops_per_param_sample": k}
    second = plan_study(study, lrs, seconds(sizes), sizes, fit=fit, images=10 ** 8, parallel=2, first=first)
    assert second["round"] == 2
    assert second["levels"] == pytest.approx(levels2, rel=1e-12)
    assert all(r["name"].split("-")[1].startswith("r2c") for r in second["fit"])
    assert not any("seed" in r for r in second["fit"])
    for j, level in enumerate(levels2):
        optimum = float(compute_optimal(law, k, level)["N"])
        at = [r["_N"] for r in second["fit"] if r["_level"] == j + 1]
        assert len(at) == 5 and min(at) < optimum < max(at), (j, at, optimum)
        assert second["placement"][j]["inside"] is True
    top = max(r["_compute"] for r in second["fit"])
    assert len(second["holdout"]) == 2
    assert all(r["_compute"] >= 2.9 * top and r["_N"] >= 2 * max(ns) for r in second["holdout"])
    # Without the first round's fit there is nothing to centre on.
    with pytest.raises(ScalingError, match="first round's fit"):
        plan_study(study, lrs, seconds(sizes), sizes, images=10 ** 8, parallel=2, first=first)


def test_families_and_rounds_in_the_study_spec(tmp_path):
    path = study_file(tmp_path, families={"enat": {}, "nat": {"model.arch": "nat", "sample.reuse": False}}, rounds=2)
    studies = family_studies(load_study(path))
    assert list(studies) == ["enat", "nat"]
    nat = studies["nat"]
    assert nat.name == "t_nat" and nat.out_dir == tmp_path / "study" / "nat"
    assert nat.overrides["model.arch"] == "nat" and nat.overrides["train.micro_batch"] == 64
    assert study_sizes(nat)["w32"]["flops_per_sample"] > study_sizes(studies["enat"])["w32"]["flops_per_sample"]
    with pytest.raises(ScalingError, match="choose a family with --family"):
        family_study(path, None)
    with pytest.raises(ScalingError, match="no family 'mat'"):
        family_study(path, "mat")
    # A family's own study keys (its minutes, its LR grid); what defines the comparison stays shared.
    own = family_studies(load_study(study_file(tmp_path, families={
        "enat": {}, "nat": {"model.arch": "nat", "study": {"minutes": 6, "lr_sweep": {
            "sizes": ["w32"], "lrs": [4e-3], "steps": 50}}}})))
    assert (own["enat"].minutes, own["nat"].minutes) == (20, 6) and own["nat"].lr_sweep["sizes"] == ["w32"]
    assert "study" not in own["nat"].overrides
    with pytest.raises(ScalingError, match=r"family nat: its `study` keys \['sizes'\] cannot differ"):
        family_studies(load_study(study_file(tmp_path, families={"nat": {"study": {"sizes": {}}}})))
    with pytest.raises(ScalingError, match=r"family nat: lr_sweep sizes \['w7'\]"):
        family_studies(load_study(study_file(tmp_path, families={"nat": {"study": {"lr_sweep": {"sizes": ["w7"]}}}})))
    with pytest.raises(ScalingError, match="rounds=3"):
        load_study(study_file(tmp_path, rounds=3))
    with pytest.raises(ScalingError, match="families must map"):
        load_study(study_file(tmp_path, families=["enat", "nat"]))


# --- leave-one-out with seed twins -----------------------------------------------------------------


def test_leave_one_out_leaves_a_runs_seed_twins_out_with_it():
    """Seed twins of one run sit 5 % above the law (as a seed effect of the group would). Left in,
    they would pull the prediction of the left-out run up to them; left out with it, the
    prediction is the law's, 1/1.05 - 1 = -4.8 % off the group's observed loss."""
    law = LawFit(E=1.5, A=30.0, B=2000.0, alpha=0.3, beta=0.45)
    pts = []
    for i, n in enumerate(np.geomspace(1e5, 1e7, 6)):
        for j, c in enumerate(np.geomspace(1e13, 1e15, 4)):
            d = c / (6 * n)
            pts.append({"run": f"n{i}-c{j}", "n_params_nonembed": n, "samples": d, KEY: float(law.predict(n, d))})
    target = next(p for p in pts if p["run"] == "n2-c1")
    target[KEY] *= 1.05
    for seed in (1, 2):
        pts.append({**target, "run": f"n2-c1-seed{seed}"})
    assert twin_group("n2-c1-seed2") == twin_group("n2-c1") == "n2-c1"
    loo = leave_one_out(pts, KEY)
    rows = {r["run"]: r for r in loo["rows"]}
    for name in ("n2-c1", "n2-c1-seed1", "n2-c1-seed2"):
        assert rows[name]["left_out"] == ["n2-c1", "n2-c1-seed1", "n2-c1-seed2"]
        assert rows[name]["rel_error"] == pytest.approx(1 / 1.05 - 1, abs=2e-3)
    assert rows["n0-c0"]["left_out"] == ["n0-c0"]


# --- the data and jobs of a study ----------------------------------------------------------------------


def test_a_second_sweep_into_the_same_folder_keeps_the_first_sweeps_runs(tmp_path):
    from launch.sweep import merged_manifest

    first = {"name": "s_fit", "sweep": "plan/s_fit.yaml", "runs": [{"name": "a-c1"}, {"name": "b-c1"}]}
    second = {"name": "s_fit2", "sweep": "plan/s_fit2.yaml", "runs": [{"name": "a-r2c1"}]}
    both = merged_manifest(first, second)
    assert both["name"] == "s_fit" and both["sweeps"] == ["plan/s_fit.yaml", "plan/s_fit2.yaml"]
    assert [r["name"] for r in both["runs"]] == ["a-c1", "b-c1", "a-r2c1"]
    # The first spec submitted again (a study continuing): its entries are renewed, round 2's kept.
    again = merged_manifest(both, {**first, "runs": [{"name": "a-c1", "job_id": "7"}, {"name": "b-c1"}]})
    assert [r["name"] for r in again["runs"]] == ["a-r2c1", "a-c1", "b-c1"]
    assert again["runs"][1]["job_id"] == "7" and again["sweeps"] == both["sweeps"]
    # One spec on its own folder: its manifest as written.
    assert merged_manifest(None, first) == first and merged_manifest(first, first) == first


def test_tokenize_jobs_take_the_threads_they_were_given(monkeypatch):
    import torch

    import launch.jobs as jobs
    from enat.config import load_config, to_dict

    cfg = load_config("configs/experiments/scaling_fashion.yaml", ["launch.cpus_per_task=1"])
    seen = {}
    monkeypatch.setattr(jobs, "tokenize_split", lambda *a, **k: seen.setdefault("tokenize", torch.get_num_threads()))
    monkeypatch.setattr(jobs, "merge_split", lambda *a, **k: seen.setdefault("merge", torch.get_num_threads())
                        or type("M", (), {"num_samples": 0, "shards": []})())
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        jobs.tokenize_job(to_dict(cfg), "train", 0, 1)
        torch.set_num_threads(2)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
        try:
            jobs.merge_job(to_dict(cfg), "train")
        except AttributeError:
            pass
    finally:
        torch.set_num_threads(threads)
    assert seen == {"tokenize": 1, "merge": 3}


def test_the_fid_reference_of_augmented_digits_is_the_real_held_out_digits():
    from enat.config import load_config
    from enat.eval.reference import reference_spec

    spec = reference_spec(load_config("configs/experiments/scaling_digits.yaml"))
    assert spec["kind"] == "digits-val"  # not the validation shards' tokenizer reconstructions
    fashion = reference_spec(load_config("configs/experiments/scaling_fashion.yaml"))
    assert fashion["kind"] == "fashion-test" and fashion["resolution"] == 32


def test_runs_for_a_narrower_interval_are_extrapolated_from_the_measured_narrowing():
    from scaling.compare import identification, runs_for_width

    # 20 -> 80 runs halved the width: width ~ runs^-0.5, so 0.3 from 0.6 takes 4x the runs.
    got = runs_for_width(80, 0.6, 20, 1.2)
    assert got["exponent"] == pytest.approx(0.5) and got["runs"] == 320 and "measured" in got["source"]
    # A width that did not shrink says nothing: the bootstrap's 1/sqrt(n), said so.
    assert runs_for_width(40, 0.6, 20, 0.5) == {"runs": 160, "exponent": 0.5, "source": "assumed: width ~ runs^-0.5"}
    assert runs_for_width(40, 0.2)["runs"] == 40  # already narrow enough
    report = {"law": {"E": 1.0, "n_runs": 40, "ci": {"alpha": [0.1, 0.7], "beta": [0.3, 0.5], "E": [0.5, 1.5]}},
              "approaches": {"spread": 0.2, "approaches": [{"method": "envelope of", "a": 0.4, "ci": [0.3, 0.6]}]},
              "sensitivity": [{"changed": None, "E": 1.0}, {"changed": "sizes", "E": 0.2, "a": 0.6}]}
    ident = identification(report, {"law": {"n_runs": 20, "ci": {"alpha": [0.0, 1.2], "beta": [0.3, 0.5]}}})
    assert ident["widths"]["alpha"] == {"now": pytest.approx(0.6), "round1": pytest.approx(1.2)}
    assert ident["needed"]["alpha"]["runs"] == 80  # 20 -> 40 runs halved it: width ~ runs^-1, 2x again
    assert ident["needed"]["beta"]["runs"] == 40
    assert ident["E"] == {"all": 1.0, "ci": [0.5, 1.5], "without_smallest": 0.2, "a_without_smallest": 0.6}
    assert ident["goals_met"] == {"widths": False, "spread": False}


def test_a_sweep_without_fid_jobs_does_not_train_the_fid_classifier(tmp_path):
    from enat.config import load_config
    from launch.tokenize import needs_models

    tok = tmp_path / "tokenizer.pt"
    tok.write_bytes(b"present")
    cfg = load_config("configs/experiments/scaling_fashion.yaml",
                      [f"tokenizer.checkpoint={tok}", f"eval.extractor_weights={tmp_path / 'missing.pt'}"])
    assert needs_models(cfg) is True  # FID jobs follow: the classifier is built first
    assert needs_models(cfg, extractor=False) is False
    tok.unlink()
    assert needs_models(cfg, extractor=False) is True


def test_each_levels_minimum_and_its_neighbours():
    from scaling.tables import level_minima

    law = LawFit(E=1.5, A=30.0, B=2000.0, alpha=0.3, beta=0.45)
    grid = np.geomspace(1e4, 1e7, 7)
    budgets = (1e12, 1e14)  # the law's minimum: the smallest size, then the fourth
    pts = [{"run": f"n{int(n)}-c{j}", "n_params_nonembed": n, "samples": c / (6 * n), "compute": c,
            KEY: float(law.predict(n, c / (6 * n)))} for j, c in enumerate(budgets) for n in grid]
    first, second = level_minima(pts, KEY)
    assert first["best_N"] == pytest.approx(grid[0]) and first["inside"] is False and first["below"] is None
    assert second["best_N"] == pytest.approx(grid[3]) and second["inside"] is True
    assert second["below"] == pytest.approx(float(law.predict(grid[2], 1e14 / (6 * grid[2]))))
    assert second["above"] == pytest.approx(float(law.predict(grid[4], 1e14 / (6 * grid[4]))))
    # Seed repeats at a size are averaged before the minimum is taken.
    twin = {**pts[8], "run": pts[8]["run"] + "-seed1", KEY: pts[8][KEY] - 1.0}
    assert level_minima(pts + [twin], KEY)[1]["best_N"] == pytest.approx(grid[1])


def test_a_plan_whose_levels_cannot_give_min_steps_is_refused(tmp_path):
    """Too few minutes for the sizes: the planner used to fall back to the smallest sizes whatever
    their steps (a fashion plan had 42-step runs); now it says what to change."""
    study = load_study(study_file(tmp_path, minutes=8, min_steps=20000))
    sizes = study_sizes(study)
    with pytest.raises(ScalingError, match="fewer than min_steps=20000 steps .*give the study more minutes"):
        plan_study(study, {n: 2e-3 for n in sizes}, seconds(sizes), sizes, images=10 ** 8, parallel=2)
