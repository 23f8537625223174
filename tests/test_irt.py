"""IRT: 2PL fit, abilities, anchors, estimators and the calibration file, on responses simulated from known models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from evomerge.errors import FitnessError
from evomerge.fitness.anchors import ANCHOR_METHODS, select_anchors
from evomerge.fitness.calibration import VERSION, Calibration
from evomerge.fitness.calibration_fit import MIN_INFORMATIVE_MODELS, anchor_mean_mse, fit_calibration
from evomerge.fitness.estimators import ESTIMATORS, estimate, estimate_details
from evomerge.fitness.irt import ItemParams, Prior, fit_ability
from evomerge.fitness.irt_fit import fit_2pl
from evomerge.fitness.responses import Responses, read_responses
from evomerge.registry import UnknownNameError


def simulate(theta: np.ndarray, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0/1 answers (M, N) of models with abilities theta (M, D) to items (a (N, D), b (N,))."""
    return (rng.random((len(theta), len(b))) < expit(theta @ a.T - b)).astype(np.float64)


@pytest.fixture(scope="module")
def merges():
    """A task of 300 items; 3 sources, 24 calibration merges of them and 120 held-out merges (abilities are
    mixtures of the sources' abilities plus a little noise), like the models a merge search visits."""
    rng = np.random.default_rng(7)
    n, d = 300, 2
    a = rng.lognormal(0.0, 0.3, size=(n, d)) * 1.5
    b = rng.normal(0.0, 2.5, size=n)
    sources = rng.normal(size=(3, d)) * 1.2

    def merged(count: int) -> np.ndarray:
        return rng.dirichlet(np.ones(3), size=count) @ sources + rng.normal(scale=0.2, size=(count, d))

    calib_theta = np.vstack([sources, merged(24)])
    models = ["src0", "src1", "src2"] + [f"merge{i}" for i in range(24)]
    calib = Responses(models, [f"q{j}" for j in range(n)], simulate(calib_theta, a, b, rng))
    heldout = simulate(merged(120), a, b, rng)
    return calib, heldout


@pytest.fixture(scope="module")
def calibration(merges) -> Calibration:
    calib, _ = merges
    return fit_calibration({"task": calib}, n_anchors=20, seed=0, anchor_method="irt",
                           sources=["src0", "src1", "src2"], dims=[1, 2])


def test_fit_recovers_item_parameters():
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(300, 1))
    a = rng.lognormal(0.0, 0.5, size=(200, 1))
    b = rng.normal(0.0, 1.5, size=200)
    y = simulate(theta, a, b, rng)
    y[rng.random(y.shape) < 0.05] = np.nan  # missing entries are skipped, not read as wrong
    fit = fit_2pl(y, 1, prior=Prior(a_sd=1.0))
    assert np.corrcoef(fit.items.b, b)[0, 1] >= 0.9
    # D = 1: a is identified up to sign; the fit orients it so that higher ability means more right answers
    assert np.corrcoef(fit.items.a[:, 0], a[:, 0])[0, 1] >= 0.9
    assert np.corrcoef(fit.theta[:, 0], theta[:, 0])[0, 1] >= 0.95
    # abilities are standardised over the fitted models: N(0, I) is then their population
    assert abs(fit.theta.mean()) < 1e-6 and fit.theta.std(ddof=1) == pytest.approx(1.0, abs=1e-3)


def test_fit_is_deterministic():
    rng = np.random.default_rng(1)
    y = simulate(rng.normal(size=(15, 2)), rng.normal(size=(80, 2)), rng.normal(size=80), rng)
    first, second = fit_2pl(y, 2), fit_2pl(y, 2)
    np.testing.assert_array_equal(first.items.a, second.items.a)
    np.testing.assert_array_equal(first.items.b, second.items.b)


def test_ability_map_tracks_true_ability():
    rng = np.random.default_rng(2)
    items = ItemParams(rng.lognormal(0.0, 0.3, size=(400, 1)) * 1.5, rng.normal(0.0, 1.5, size=400))
    theta = rng.normal(size=(50, 1))
    y = simulate(theta, items.a, items.b, rng)
    y[:, ::2] = np.nan  # each model seen on half of the items
    est = fit_ability(items, y)
    assert np.corrcoef(est[:, 0], theta[:, 0])[0, 1] > 0.95
    # all right on a few items: the prior keeps the MAP finite
    assert np.isfinite(fit_ability(items.take([0, 1, 2]), np.ones((1, 3)))).all()


def test_irt_estimators_beat_random_subset_mean(merges, calibration):
    _, heldout = merges
    truth = heldout.mean(axis=1)
    rng = np.random.default_rng(3)
    errors: dict[str, list[float]] = {"mean": [], "pirt": [], "gpirt": []}
    for row, acc in zip(heldout, truth):
        subset = rng.choice(heldout.shape[1], size=20, replace=False)
        est = estimate(calibration, "task", [f"q{j}" for j in subset], row[subset], estimators=["pirt", "gpirt"])
        errors["mean"].append(abs(row[subset].mean() - acc))
        errors["pirt"].append(abs(est["pirt"] - acc))
        errors["gpirt"].append(abs(est["gpirt"] - acc))
    mae = {k: float(np.mean(v)) for k, v in errors.items()}
    assert mae["pirt"] < 0.85 * mae["mean"], mae
    assert mae["gpirt"] < 0.85 * mae["mean"], mae


def test_estimators_on_the_anchors(merges, calibration):
    _, heldout = merges
    truth = heldout.mean(axis=1)
    anchors = calibration.anchors("task")
    cols = [int(i[1:]) for i in anchors]
    est = [estimate(calibration, "task", anchors, row[cols]) for row in heldout]
    assert set(est[0]) == set(ESTIMATORS.names())  # sources given: mp-IRT and gmp-IRT are there too
    for name in ESTIMATORS.names():
        values = np.array([e[name] for e in est])
        assert ((values >= 0) & (values <= 1)).all()
        assert np.mean(np.abs(values - truth)) < 0.1, name
    mae = {n: np.mean(np.abs(np.array([e[n] for e in est]) - truth)) for n in ("anchor_mean", "pirt")}
    assert mae["pirt"] < mae["anchor_mean"], mae


def test_mpirt_weights_are_on_the_simplex_and_find_a_source(merges, calibration):
    calib, _ = merges
    row = calib.values[calib.models.index("src1")]
    values, weights = estimate_details(calibration, "task", calib.items, row, estimators=["mpirt"])
    assert list(weights) == ["src0", "src1", "src2"]
    assert sum(weights.values()) == pytest.approx(1.0) and min(weights.values()) >= 0
    # all 300 answers of source 1: the mixed ability is (nearly) source 1's (the weights themselves need not be
    # unique: with D = 1 any two sources on either side of it mix to it)
    task = calibration.task("task")
    mixed = np.array(list(weights.values())) @ task.source_theta
    assert np.abs(mixed - task.source_theta[1]).max() < 0.25
    assert values["mpirt"] == pytest.approx(row.mean(), abs=0.02)


def test_lambdas_and_settings_are_saved(calibration):
    task = calibration.task("task")
    assert 0 <= task.lambdas["gpirt"] <= 1 and 0 <= task.lambdas["gmpirt"] <= 1
    assert task.items.dims in (1, 2)
    assert set(task.sources) == {"src0", "src1", "src2"}
    assert calibration.settings["anchor_method"] == "irt" and calibration.seed == 0


@pytest.mark.parametrize("method", ["random", "correctness", "irt"])
def test_anchors_follow_the_seed(merges, method):
    calib, _ = merges
    items = fit_2pl(calib.values, 1).items
    first = select_anchors(method, 15, calib.values, items, seed=1)
    again = select_anchors(method, 15, calib.values, items, seed=1)
    other = select_anchors(method, 15, calib.values, items, seed=2)
    np.testing.assert_array_equal(first.index, again.index)
    np.testing.assert_array_equal(first.weights, again.weights)
    assert not np.array_equal(first.index, other.index)
    assert len(set(first.index.tolist())) == 15
    assert first.weights.sum() == pytest.approx(1.0)
    assert (first.weights > 0).all()
    # the weight of an anchor is the share of the items in its cluster
    np.testing.assert_allclose(first.weights, np.bincount(first.labels, minlength=15) / calib.values.shape[1])


def test_unknown_anchor_method_suggests_names():
    with pytest.raises(UnknownNameError, match="did you mean 'random'"):
        ANCHOR_METHODS["randon"]


def test_calibration_round_trip(tmp_path, merges, calibration):
    _, heldout = merges
    path = tmp_path / "calibration.json"
    calibration.save(path)
    loaded = Calibration.load(path)
    assert loaded.anchors("task") == calibration.anchors("task")
    assert loaded.anchor_weights("task") == pytest.approx(calibration.anchor_weights("task"), rel=1e-6)
    assert loaded.seed == calibration.seed and loaded.settings == json.loads(json.dumps(calibration.settings))
    np.testing.assert_allclose(loaded.task("task").items.a, calibration.task("task").items.a, rtol=1e-6, atol=1e-7)
    cols = [int(i[1:]) for i in calibration.anchors("task")]
    before = estimate(calibration, "task", calibration.anchors("task"), heldout[0, cols])
    after = estimate(loaded, "task", loaded.anchors("task"), heldout[0, cols])
    assert after == pytest.approx(before, abs=1e-5)
    loaded.save(tmp_path / "again.json")  # a loaded file writes back the same
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_calibration_of_another_version_is_refused(tmp_path, calibration):
    path = tmp_path / "old.json"
    data = calibration.to_json()
    data["version"] = VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(FitnessError, match=f"version {VERSION + 1}.*reads version {VERSION}") as err:
        Calibration.load(path)
    assert "\n" not in str(err.value)


def test_estimate_rejects_items_not_in_the_task(calibration):
    with pytest.raises(FitnessError, match="'nope'.*not items of task 'task'"):
        estimate(calibration, "task", ["q0", "nope"], np.array([1.0, 0.0]))
    with pytest.raises(FitnessError, match="no task 'other'"):
        estimate(calibration, "other", ["q0"], np.array([1.0]))
    with pytest.raises(UnknownNameError, match="did you mean 'pirt'"):
        estimate(calibration, "task", ["q0"], np.array([1.0]), estimators=["pirtt"])


def test_several_tasks_each_with_their_own_model_and_anchors(merges):
    calib, _ = merges
    rng = np.random.default_rng(5)
    second = Responses(calib.models, [f"r{j}" for j in range(120)], simulate(
        rng.normal(size=(len(calib.models), 1)), rng.lognormal(size=(120, 1)), rng.normal(size=120), rng))
    cal = fit_calibration({"one": calib, "two": second}, n_anchors=10, seed=4, anchor_method="random", dims=1)
    assert list(cal.tasks) == ["one", "two"]
    assert all(i.startswith("q") for i in cal.anchors("one")) and all(i.startswith("r") for i in cal.anchors("two"))
    assert cal.task("one").seed != cal.task("two").seed  # each task draws from its own seed
    est = estimate(cal, "two", cal.anchors("two"), np.ones(10))
    assert "mpirt" not in est and est["pirt"] > 0.5  # no sources: the mp estimators are left out


def test_fit_calibration_rejects_bad_requests(merges):
    calib, _ = merges
    with pytest.raises(FitnessError, match="too few for 400 anchors"):
        fit_calibration({"task": calib}, n_anchors=400, dims=1)
    with pytest.raises(FitnessError, match="--sources: 'nobody'"):
        fit_calibration({"task": calib}, n_anchors=10, dims=1, sources=["nobody"])
    with pytest.raises(FitnessError, match="at least 4"):
        fit_calibration({"task": calib.rows(calib.models[:3])}, n_anchors=10, dims=1)
    with pytest.raises(FitnessError, match="did you mean"):
        fit_calibration({"task": calib}, n_anchors=10, dims=1, anchor_method="randon")


def test_read_responses_csv_and_parquet(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text("model,q1,q2,q3\nm1,1,0,\nm2,0,1,1\n")
    r = read_responses(csv)
    assert r.models == ["m1", "m2"] and r.items == ["q1", "q2", "q3"]
    np.testing.assert_array_equal(np.isnan(r.values), [[False, False, True], [False, False, False]])
    np.testing.assert_allclose(r.accuracy(), [0.5, 2 / 3])

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"model": ["m1", "m2"], "q1": [1, 0], "q2": [True, None]}), tmp_path / "r.parquet")
    p = read_responses(tmp_path / "r.parquet")
    assert p.items == ["q1", "q2"]
    np.testing.assert_array_equal(p.values[:, 0], [1, 0])
    assert p.values[0, 1] == 1 and np.isnan(p.values[1, 1])


@pytest.mark.parametrize("text, match", [
    ("model,q1,q2\nm1,1,2\n", r"line 2 \(model 'm1'\), column 'q2' is '2': responses must be 0 or 1"),
    ("model,q1,q2\nm1,1\n", "line 2 .* has 2 fields but the header has 3"),
    ("model,q1,q1\nm1,1,0\n", "duplicate item id 'q1'"),
    ("model,q1\nm1,1\nm1,0\n", "duplicate model name 'm1'"),
    ("", "the file is empty"),
    ("model,q1\n", "no model rows"),
    ("name,q1\nm1,1\n", "name it `model`"),
])
def test_read_responses_errors_name_the_fix(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(FitnessError, match=match) as err:
        read_responses(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_anchor_mean_mse_is_the_expected_squared_error_of_the_anchor_mean():
    rng = np.random.default_rng(11)
    items = ItemParams(rng.lognormal(0.0, 0.3, size=(60, 1)) * 1.5, rng.normal(0.0, 2.0, size=60))
    theta = rng.normal(size=(4, 1))
    anchors = select_anchors("random", 12, simulate(theta, items.a, items.b, rng), items, seed=0)
    predicted = anchor_mean_mse(items, theta, anchors.index, anchors.weights)
    # the same quantity by brute force: many draws of the four models' answers
    errors = []
    for _ in range(4000):
        y = simulate(theta, items.a, items.b, rng)
        errors.append((y[:, anchors.index] @ anchors.weights - y.mean(axis=1)) ** 2)
    assert predicted == pytest.approx(float(np.mean(errors)), rel=0.05)


@pytest.mark.parametrize("method", ["irt", "correctness"])
def test_small_calibrations_still_mix_gpirt(method):
    """8 models x 40 items, 30 anchors (issue 13): few distinct answer columns, so the k-means clusters hold items
    every calibration model answered alike. Their within-cluster spread was taken for the anchor mean's variance:
    0, so lambda was 1 and gp-IRT the anchor mean for every candidate (measured: 4 to 8 models, every draw)."""
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0, 0.3, size=(40, 1)) * 1.5, rng.normal(0, 2.0, size=40)
    calib = Responses([f"m{i}" for i in range(MIN_INFORMATIVE_MODELS)], [f"q{j}" for j in range(40)],
                      simulate(rng.normal(size=(MIN_INFORMATIVE_MODELS, 1)), a, b, rng))
    new = simulate(rng.normal(size=(30, 1)), a, b, rng)
    cal = fit_calibration({"t": calib}, n_anchors=30, seed=0, anchor_method=method)
    task = cal.task("t")
    assert task.diagnostics["anchor_method"] == method  # enough models: no fallback
    assert task.diagnostics["anchor_mse"] > 0
    assert 0 < task.lambdas["gpirt"] < 0.95
    cols = [int(i[1:]) for i in cal.anchors("t")]
    est = [estimate(cal, "t", cal.anchors("t"), row[cols]) for row in new]
    gap = np.array([e["gpirt"] - e["anchor_mean"] for e in est])
    assert (np.abs(gap) > 1e-6).mean() > 0.5  # for most candidates (a few may have pirt = anchor mean)


def test_too_few_calibration_models_are_said_and_fall_back(merges, calibration):
    calib, _ = merges
    few = calib.rows(calib.models[:MIN_INFORMATIVE_MODELS - 1])
    cal = fit_calibration({"task": few}, n_anchors=20, seed=0, dims=[1, 2, 3], a_sd=[0.03, 0.1, 0.3])
    task = cal.task("task")
    said = [w for w in task.diagnostics["warnings"] if "calibration models, fewer than" in w]
    assert len(said) == 1
    assert said[0].startswith(f"{MIN_INFORMATIVE_MODELS - 1} calibration models, fewer than {MIN_INFORMATIVE_MODELS}")
    # the fallback it names: the simplest D and the middle slope sd, no held-out choice between candidates
    assert task.items.dims == 1 and task.diagnostics["a_sd"] == 0.1
    assert list(task.diagnostics["heldout_errors"]) == ["a_sd=0.1,D=1"]
    assert "IRT dimension 1, slope prior sd 0.1, anchors random (strata by item mean) instead of irt" in said[0]
    assert task.diagnostics["anchor_method"] == "random" and cal.settings["anchor_method"] == "irt"
    assert f"weight of the anchor mean {task.lambdas['gpirt']:.2f} (fitted on 1 held-out model)" in said[0]
    # 27 models (the module's calibration): enough, nothing said, candidates chosen on held-out models
    assert not any("calibration models, fewer than" in w for w in calibration.task("task").diagnostics["warnings"])
    assert len(calibration.task("task").diagnostics["heldout_errors"]) > 1
