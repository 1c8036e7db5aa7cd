"""
Tests of the evaluator: Frechet distance, Inception Score, precision/recall, npz streaming,
input checks, the feature cache and the command line (on random Inception weights).
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from evaluations import evaluator as evaluator_module, scores
from evaluations.evaluator import Evaluator, FIDStatistics, format_results
from evaluations.manifold import DistanceBlock, ManifoldEstimator
from evaluations.npz_batches import check_image_batch, open_npz_array
from evaluations.scores import (
    RunningStatistics, check_statistics, compute_statistics, describe_non_finite, inception_score,
)
from launchers import run_command
from test_inception import random_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(count, seed, size=16):
    return np.random.RandomState(seed).randint(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception-2015-12-05.pt"
    torch.save(random_state_dict(seed=3), path)
    return str(path)


@pytest.fixture(scope="module")
def evaluator(weights_path):
    return Evaluator(inception_path=weights_path, device="cpu", batch_size=3)


# --- Frechet distance ---
def _sqrt_spd(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_frechet_distance_matches_closed_form():
    rng = np.random.RandomState(0)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = rng.randn(5), rng.randn(5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = FIDStatistics(mu1, np.diag(s1)).frechet_distance(FIDStatistics(mu2, np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-10)
    # General SPD: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), computed with eigh.
    mu1, mu2, a, b = rng.randn(6), rng.randn(6), rng.randn(6, 6), rng.randn(6, 6)
    sigma1, sigma2 = a @ a.T + np.eye(6), b @ b.T + 0.1 * np.eye(6)
    root1 = _sqrt_spd(sigma1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.trace(_sqrt_spd(root1 @ sigma2 @ root1)))
    got = FIDStatistics(mu1, sigma1).frechet_distance(FIDStatistics(mu2, sigma2))
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.RandomState(1).randn(500, 8).astype(np.float32) * 3 + 1
    stats = compute_statistics(features)
    assert abs(stats.frechet_distance(stats)) < 1e-8


def test_singular_product_adds_eps_to_the_diagonals():
    nilpotent = FIDStatistics(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]))
    identity = FIDStatistics(np.zeros(2), np.eye(2))
    eps = 1e-6
    with pytest.warns(UserWarning, match="singular product"):
        got = nilpotent.frechet_distance(identity, eps=eps)
    # sqrtm of [[a, b], [0, a]] is [[sqrt a, b / (2 sqrt a)], [0, sqrt a]], a = eps (1 + eps).
    assert got == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_frechet_distance_errors():
    indefinite = FIDStatistics(np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="Imaginary component"):
        indefinite.frechet_distance(FIDStatistics(np.zeros(2), np.eye(2)))
    with pytest.raises(ValueError, match="different lengths"):
        FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(FIDStatistics(np.ones(3), np.eye(3)))


@pytest.mark.parametrize("first, second, message", [
    ((np.array([0.0, np.nan]), np.eye(2)), (np.zeros(2), np.eye(2)),
     "first statistics: mu holds 1 NaN values"),
    ((np.zeros(2), np.eye(2)), (np.zeros(2), np.diag([np.inf, 1.0])),
     "second statistics: sigma holds 1 inf values"),
    ((np.zeros(2), np.eye(2) * 1e200), (np.zeros(2), np.eye(2) * 1e200),
     "sigma1 sigma2 holds 2 inf values"),  # overflows: sqrtm of it could spin without end
])
def test_frechet_distance_refuses_statistics_that_are_not_finite(first, second, message):
    with pytest.raises(ValueError, match=f"frechet_distance.*{message}"):
        FIDStatistics(*first).frechet_distance(FIDStatistics(*second))


def test_frechet_distance_never_returns_nan(monkeypatch):
    monkeypatch.setattr("evaluations.scores.linalg.sqrtm", lambda m: np.full_like(m, np.nan))
    skewed = FIDStatistics(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))  # sqrtm's path
    with pytest.warns(UserWarning, match="singular product"), \
            pytest.raises(ValueError, match="frechet_distance: the distance is nan"):
        skewed.frechet_distance(skewed)


# Rank 5 of 64 (singular, as in tiny tests): the 59 zero eigenvalues' rounding noise, square
# rooted, moves both results by about 1e-7 relative; full rank: they agree to rounding.
@pytest.mark.parametrize("samples, tolerance", [(6, 3e-7), (300, 1e-10)])
def test_the_symmetric_trace_equals_scipys_sqrtm_on_covariances(samples, tolerance):
    rng = np.random.default_rng(samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the singular covariance's warning
        first = compute_statistics(rng.standard_normal((samples, 64)))
        second = compute_statistics(rng.standard_normal((samples, 64)) * 1.5 + 0.2)
    ours = scores.trace_sqrt_product(first.sigma, second.sigma)
    scipys = np.trace(linalg.sqrtm(first.sigma @ second.sigma)).real
    assert ours == pytest.approx(scipys, rel=tolerance)
    eigenvalues = np.sort(np.linalg.eigvals(first.sigma @ second.sigma).real)[::-1][: samples - 1]
    exact = np.sqrt(eigenvalues).sum()  # only samples - 1 of them are not zero
    assert abs(ours - exact) <= abs(scipys - exact) + 1e-12
    assert scores.trace_sqrt_product(np.diag([1.0, -1.0]), np.eye(2)) is None  # indefinite
    assert scores.trace_sqrt_product(np.triu(np.ones((2, 2))), np.eye(2)) is None  # not symmetric


def test_check_statistics_names_the_array_and_the_problem():
    sigma = np.eye(3)
    check_statistics(np.zeros(3), sigma + 1e-9 * np.triu(np.ones((3, 3)), 1), 3, "ref.npz")
    bad_sigma = sigma.copy()
    bad_sigma[0, :3] = [np.inf, np.nan, np.inf]
    cases = [
        ((np.zeros(3), bad_sigma), "ref.npz: sigma holds 1 NaN and 2 inf values; .*make_reference"),
        ((np.array([np.nan, 0, 0]), sigma), "ref.npz: mu holds 1 NaN values"),
        ((np.zeros(3), sigma + np.triu(np.ones((3, 3)), 1)), "ref.npz: sigma is not symmetric"),
        ((np.zeros(3), sigma[:2]), r"ref.npz: mu/sigma have shapes \(3,\) and \(2, 3\)"),
        ((np.zeros(3), sigma.astype(str)), "sigma holds values of dtype <U32, not real numbers"),
    ]
    for (mu, sigma_), message in cases:
        with pytest.raises(ValueError, match=message):
            check_statistics(mu, sigma_, 3, "ref.npz")
    with pytest.raises(ValueError, match="ref.npz: sigma_s is not symmetric"):
        check_statistics(np.zeros(3), np.tril(np.ones((3, 3))), 3, "ref.npz", ("mu_s", "sigma_s"))
    assert describe_non_finite(np.arange(3)) == ""


def test_statistics_match_numpy_and_warn_when_singular():
    features = np.random.RandomState(2).randn(10, 4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = compute_statistics(features)
    np.testing.assert_array_equal(stats.mu, np.mean(features, axis=0))
    np.testing.assert_array_equal(stats.sigma, np.cov(features, rowvar=False))
    with pytest.warns(UserWarning, match="3 samples for 4 features.*singular"):
        few = compute_statistics(features[:3])
    assert np.isfinite(few.sigma).all()
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_statistics(features[:1])


def test_running_statistics_match_numpy():
    features = np.random.RandomState(3).randn(50, 6) * 5 + 100
    running = RunningStatistics(6)
    for start, end in [(0, 7), (7, 8), (8, 31), (31, 50)]:
        running.update(features[start:end])
    stats = running.statistics()
    np.testing.assert_allclose(stats.mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-10)


# --- Inception Score ---
def test_inception_score_of_hand_made_tables():
    assert inception_score(np.full((10, 7), 1 / 7)) == pytest.approx(1.0)
    assert inception_score(np.eye(6)) == pytest.approx(6.0)  # one sample per class
    assert inception_score(np.tile(np.eye(4), (3, 1))) == pytest.approx(4.0)
    # Two splits of 4: one-hot over 4 classes (IS 4), then uniform rows (IS 1).
    table = np.concatenate([np.eye(4), np.full((4, 4), 0.25)])
    assert inception_score(table, split_size=4) == pytest.approx(2.5)
    # Half the samples sure of class 0, half of class 1: KL = log 2 per sample.
    assert inception_score(np.array([[1, 0, 0]] * 3 + [[0, 1, 0]] * 3)) == pytest.approx(2.0)


def test_evaluator_inception_score_is_softmax_of_features_times_weights(evaluator):
    features = np.abs(np.random.RandomState(4).randn(20, 2048)).astype(np.float32)
    weight = evaluator.model.output.weight.numpy().astype(np.float64)
    logits = features.astype(np.float64) @ weight.T  # no bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    expected = inception_score(probabilities, split_size=7)
    got = evaluator.compute_inception_score(features, split_size=7)
    assert got == pytest.approx(expected, rel=1e-5)


# --- precision and recall ---
def _line(points):
    """Points on a line embedded in 3 dimensions."""
    points = np.asarray(points, np.float32)
    return np.stack([points, np.zeros_like(points), np.ones_like(points)], axis=1)


def _brute_force_pr(ref, sample, k=3):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((ref[:, None].astype(np.float64) - sample[None]) ** 2).sum(-1)
    precision = np.mean((d <= radii(ref)[:, None]).any(axis=0))
    recall = np.mean((d <= radii(sample)[None, :]).any(axis=1))
    return precision, recall


@pytest.mark.parametrize("block", [10000, 3])
def test_precision_recall_on_point_clouds(block):
    ref = _line(range(10))  # interior radii: 3rd neighbour at distance 2
    sample = _line([0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004])
    estimator = ManifoldEstimator(row_batch_size=block, col_batch_size=block)
    radii_ref, radii_sample = estimator.manifold_radii(ref), estimator.manifold_radii(sample)
    np.testing.assert_array_equal(radii_ref[:, 0], [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
    precision, recall = estimator.evaluate_pr(ref, radii_ref, sample, radii_sample)
    # Samples 0-4 lie on the reference line, 1000-1004 far away; sample balls (radius 2
    # or 3 around 0..4) cover references 0..7.
    assert (precision[0], recall[0]) == (0.5, 0.8)
    assert (precision[0], recall[0]) == _brute_force_pr(ref, sample)
    ref_in, sample_in = estimator.distance_block.less_thans(ref, radii_ref, sample, radii_sample)
    assert (sample_in.mean(), ref_in.mean()) == (0.5, 0.8)
    same = estimator.evaluate_pr(ref, radii_ref, ref, radii_ref)
    assert (same[0][0], same[1][0]) == (1.0, 1.0)


def test_evaluate_gives_membership_realism_and_nearest():
    ref = _line(range(10))
    estimator = ManifoldEstimator(row_batch_size=2, col_batch_size=4)
    radii = estimator.manifold_radii(ref)
    # Coordinates whose float16 distances are exact.
    result = estimator.evaluate(ref, radii, _line([0.5, 8.75, 40.0]))
    np.testing.assert_array_equal(result["batch_predictions"][:, 0], [1, 1, 0])
    np.testing.assert_array_equal(result["nearest_indices"], [0, 9, 9])
    assert result["fraction"] == pytest.approx(2 / 3)
    d = (ref[:, 0][None] - np.array([[0.5], [8.75], [40.0]])) ** 2
    expected = (radii[:, 0][None] / (d + 1e-5)).max(axis=1)
    np.testing.assert_allclose(result["max_realisim_score"], expected, rtol=1e-6)


def test_distances_use_float16_and_fall_back_to_float32():
    block = DistanceBlock()
    small = block.pairwise_distances([[0.1]], [[0.0]])  # float16 is finite: used
    assert small[0, 0] == np.float32(np.float16(np.float16(0.1) * np.float16(0.1)))
    assert small[0, 0] != np.float32(0.1) ** 2
    large = block.pairwise_distances([[300.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]])  # 9e4 > 65504
    np.testing.assert_array_equal(large, [[90000.0, 90001.0]])
    sample_far = _line([0, 1, 2, 3, 400])
    radii = ManifoldEstimator().manifold_radii(sample_far)
    assert radii[-1, 0] == 399.0**2  # 3rd neighbour of 400 is 1; > 65504 needs float32


def test_manifold_needs_more_points_than_k():
    with pytest.raises(ValueError, match="more than k=3"):
        ManifoldEstimator().manifold_radii(_line([0, 1, 2]))


# --- npz reading and bad input ---
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_arrays_stream_in_batches(tmp_path, save):
    images = _images(7, seed=5, size=4)
    path = str(tmp_path / "batch.npz")
    save(path, images, labels=np.arange(7))
    with open_npz_array(path, "arr_0") as reader:
        batches = reader.read_batches(3)
        assert len(batches) == 3
        read = list(batches)
    assert [len(b) for b in read] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(read), images)
    fortran = str(tmp_path / "fortran.npz")
    np.savez(fortran, np.asfortranarray(images))
    with open_npz_array(fortran, "arr_0") as reader:
        np.testing.assert_array_equal(np.concatenate(list(reader.read_batches(4))), images)


def test_bad_batches_are_refused(tmp_path, evaluator):
    def npz(name, **arrays):
        path = str(tmp_path / name)
        np.savez(path, **arrays)
        return path

    cases = [
        (npz("labels.npz", labels=np.arange(3)), ValueError, "no array 'arr_0'"),
        (npz("float.npz", arr_0=_images(2, 0).astype(np.float32)), ValueError, "expected uint8"),
        (npz("nchw.npz", arr_0=_images(2, 0).transpose(0, 3, 1, 2)), ValueError, "looks like NCHW"),
        (npz("gray.npz", arr_0=_images(2, 0)[..., :1]), ValueError, r"3 \(RGB\) channels"),
        (npz("flat.npz", arr_0=_images(2, 0)[..., 0]), ValueError, r"\[N, H, W, 3\]"),
        (str(tmp_path / "missing.npz"), FileNotFoundError, "missing.npz"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            evaluator.read_activations(path)
    with_nan = _images(1, 0).astype(np.float32)
    with_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluator.compute_activations([with_nan])
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        check_image_batch(_images(1, 0).astype(np.float32) * 2)
    with pytest.raises(ValueError, match="expected uint8"):
        check_image_batch(_images(1, 0).astype(np.int64))


def test_reference_statistics_are_read_and_checked(tmp_path, evaluator):
    rng = np.random.RandomState(6)
    mu, sigma, mu_s = rng.randn(2048), np.eye(2048), rng.randn(2023)
    good = str(tmp_path / "ref.npz")
    np.savez(good, arr_0=_images(2, 0), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=np.eye(2023))
    stats, stats_spatial = evaluator.read_statistics(good, (None, None))
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats_spatial.mu, mu_s)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, arr_0=_images(2, 0), mu=mu[:100], sigma=sigma, mu_s=mu_s, sigma_s=np.eye(2023))
    with pytest.raises(ValueError, match=r"mu/sigma.*\(100,\).*expected \(2048,\)"):
        evaluator.read_statistics(bad, (None, None))
    half = str(tmp_path / "half.npz")
    np.savez(half, arr_0=_images(2, 0), mu=mu)
    with pytest.raises(ValueError, match="only one of 'mu' and 'sigma'"):
        evaluator.read_statistics(half, (None, None))


def test_reference_statistics_are_checked_before_the_features(tmp_path, evaluator, monkeypatch):
    sigma = np.eye(2048)
    sigma[5, 7] = 0.5  # not symmetric
    reference = str(tmp_path / "ref.npz")
    np.savez_compressed(reference, arr_0=_images(2, 0), mu=np.zeros(2048), sigma=sigma)

    def fail(npz_path):
        raise AssertionError("features computed before the statistics were checked")

    monkeypatch.setattr(evaluator, "read_activations", fail)
    with pytest.raises(ValueError, match="ref.npz: sigma is not symmetric"):
        evaluator.read_batch_features(reference, use_cache=False)


def test_features_that_are_not_finite_are_refused(tmp_path, evaluator, monkeypatch):
    path = str(tmp_path / "samples.npz")
    np.savez(path, _images(2, seed=1))
    forward = evaluator._forward

    def nan_pool(batch):
        pool, spatial = forward(batch)
        return pool * float("nan"), spatial

    monkeypatch.setattr(evaluator, "_forward", nan_pool)
    message = "samples.npz: Inception pool output holds 4096 NaN values; .*weights are damaged"
    with pytest.raises(ValueError, match=message):
        evaluator.read_activations(path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:3 samples for")
def test_a_cache_holding_nan_is_ignored(tmp_path, evaluator):
    path = str(tmp_path / "samples.npz")
    np.savez(path, _images(3, seed=2))
    pool = evaluator.read_batch_features(path)[0]
    (cache,) = [tmp_path / p for p in os.listdir(tmp_path) if p.startswith("samples.npz.features-")]
    with np.load(cache) as data:
        arrays = dict(data)
    arrays["sigma"][0, 0] = np.nan
    np.savez(cache, **arrays)
    with pytest.warns(UserWarning, match=r"ignoring feature cache .*\.npz: sigma holds 1 NaN"):
        again, stats, _ = evaluator.read_batch_features(path)
    np.testing.assert_array_equal(again, pool)
    assert np.isfinite(stats.sigma).all()


# --- features, cache and command line ---
@pytest.mark.slow
def test_features_are_cached_next_to_the_batch(tmp_path, evaluator, monkeypatch):
    path = str(tmp_path / "samples.npz")
    np.savez(path, _images(4, seed=7))
    with pytest.warns(UserWarning, match="4 samples for 2048 features"):
        pool, stats, stats_spatial = evaluator.read_batch_features(path)
    assert pool.shape == (4, 2048) and stats_spatial.mu.shape == (2023,)
    assert len([p for p in os.listdir(tmp_path) if p.startswith("samples.npz.features-")]) == 1

    def fail(npz_path):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(evaluator, "read_activations", fail)
    cached_pool, cached_stats, _ = evaluator.read_batch_features(path)
    np.testing.assert_array_equal(cached_pool, pool)
    np.testing.assert_array_equal(cached_stats.sigma, stats.sigma)
    np.savez(path, _images(4, seed=8))  # new content: a new key
    with pytest.raises(AssertionError, match="recomputed"):
        evaluator.read_batch_features(path)


@pytest.mark.slow
def test_command_line_on_a_batch_against_itself(tmp_path, weights_path, capsys, evaluator, monkeypatch):
    batch = str(tmp_path / "batch.npz")
    np.savez(batch, _images(4, seed=9, size=24))
    # scipy's sqrtm of a 2048 x 2048 matrix takes ~10 s on two cores: compute each distance
    # on the leading 64 dimensions (the real method, tested above) and record the shapes.
    frechet_distance, shapes = FIDStatistics.frechet_distance, []

    def leading_block(self, other):
        shapes.append((self.sigma.shape, other.sigma.shape))
        head = slice(0, 64)
        return frechet_distance(
            FIDStatistics(self.mu[head], self.sigma[head, head]),
            FIDStatistics(other.mu[head], other.sigma[head, head]),
        )

    monkeypatch.setattr(FIDStatistics, "frechet_distance", leading_block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 samples for 2048 features
        argv = [batch, batch, "--inception_path", weights_path, "--json", "--batch_size", "3"]
        evaluator_module.main(argv)
        pool = evaluator.read_batch_features(batch)[0]  # from the cache the command line wrote
    results = json.loads(capsys.readouterr().out)
    assert sorted(results) == ["fid", "inception_score", "precision", "recall", "sfid"]
    assert shapes == [((2048, 2048), (2048, 2048)), ((2023, 2023), (2023, 2023))]
    assert abs(results["fid"]) < 1e-3 and abs(results["sfid"]) < 1e-3
    assert (results["precision"], results["recall"]) == (1.0, 1.0)
    expected_is = evaluator.compute_inception_score(pool)
    assert results["inception_score"] == pytest.approx(expected_is, rel=1e-6)


def test_output_lines_are_the_originals():
    results = {"inception_score": 1.5, "fid": 2.25, "sfid": 3.0, "precision": 0.5, "recall": 0.75}
    assert format_results(results).splitlines() == [
        "Inception Score: 1.5", "FID: 2.25", "sFID: 3.0", "Precision: 0.5", "Recall: 0.75",
    ]


@pytest.mark.slow
def test_script_runs_without_installation():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "evaluations", "evaluator.py"), "--help"],
        capture_output=True, text=True, cwd=os.path.dirname(REPO),
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "ref_batch" in result.stdout and "--json" in result.stdout


def test_inputs_that_are_not_image_npz_files_are_named(tmp_path, evaluator):
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("not a zip")
    with pytest.raises(ValueError, match=r"notes.npz: not an .npz file .*uint8 \[N, H, W, 3\]"):
        evaluator.read_batch_features(str(not_npz), use_cache=True)
    objects = str(tmp_path / "objects.npz")
    np.savez(objects, np.array([object(), object()], dtype=object))
    with pytest.raises(ValueError, match="objects.npz arr_0: an object array"):
        evaluator.read_batch_features(objects, use_cache=False)


def test_a_corrupt_inception_file_is_named(tmp_path, weights_path):
    truncated = tmp_path / "inception-2015-12-05.pt"
    truncated.write_bytes(open(weights_path, "rb").read()[:4096])
    with pytest.raises(ValueError, match="inception-2015-12-05.pt: a corrupt or truncated PyTorch file"):
        Evaluator(inception_path=str(truncated), device="cpu")


@pytest.mark.parametrize("damage, message", [
    ("sigma_inf", "sigma holds 3 inf values"),
    ("mu_nan", "mu holds 1 NaN values"),
    ("sigma_asymmetric", "sigma is not symmetric"),
])
@pytest.mark.slow
def test_the_script_refuses_damaged_reference_statistics(tmp_path, weights_path, damage, message):
    mu, sigma = np.zeros(2048), np.eye(2048)
    if damage == "sigma_inf":
        sigma[[0, 5, 9], [0, 5, 3]] = np.inf
    elif damage == "mu_nan":
        mu[17] = np.nan
    else:
        sigma[3, 9] = 0.25
    reference, samples = str(tmp_path / "REF.npz"), str(tmp_path / "SAMPLE.npz")
    np.savez_compressed(reference, arr_0=_images(2, 0), mu=mu, sigma=sigma)
    np.savez(samples, _images(2, 1))
    result = run_command(  # scipy's sqrtm on inf would spin: the timeout fails the test
        [sys.executable, os.path.join(REPO, "evaluations", "evaluator.py"), reference, samples,
         "--inception_path", weights_path], os.environ, os.getcwd(), 120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"evaluator.py: {reference}: {message}" in result.stderr
    assert "FID" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["evaluator.py", "make_reference.py"])
def test_offline_without_weights_the_scripts_print_only_the_fix(tmp_path, script):
    batch = str(tmp_path / "batch.npz")
    np.savez(batch, _images(2, seed=1))
    # A proxy on a closed local port: the download fails at once, as offline.
    env = {**os.environ, "GUIDED_DIFFUSION_CACHE": str(tmp_path / "cache"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    env.pop("GUIDED_DIFFUSION_INCEPTION", None)
    result = run_command([sys.executable, os.path.join(REPO, "evaluations", script), batch,
                          str(tmp_path / "out.npz")], env, os.getcwd(), 120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{script}: no weights in {tmp_path / 'cache'} and the download failed" in result.stderr
    assert "--inception_path FILE" in result.stderr and len(result.stderr.splitlines()) < 10
