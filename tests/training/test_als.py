"""ALS fitting: reproducibility, factor checks, parameter parsing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from training.als import (
    FitError,
    TrainParams,
    check_factors,
    fit_als,
    gpu_available,
    recommender_from_factors,
)


def random_confidence(seed=0, users=60, items=40, density=0.1):
    matrix = sp.random(users, items, density=density, random_state=seed, format="csr", dtype=np.float32)
    matrix.data = 1 + 9 * matrix.data
    return matrix


SMALL = TrainParams(factors=8, iterations=5)


def test_same_seed_and_threads_give_identical_factors():
    conf = random_confidence()
    u1, i1 = fit_als(conf, SMALL, seed=3, threads=2, device="cpu")
    u2, i2 = fit_als(conf, SMALL, seed=3, threads=2, device="cpu")
    assert u1.dtype == np.float32 and u1.shape == (60, 8) and i1.shape == (40, 8)
    assert np.array_equal(u1, u2) and np.array_equal(i1, i2)
    u3, _ = fit_als(conf, SMALL, seed=4, threads=2, device="cpu")
    assert not np.array_equal(u1, u3)


def test_factors_fit_the_data():
    # Two blocks of users liking two disjoint item groups: scores must respect the blocks.
    block = np.zeros((20, 10), dtype=np.float32)
    block[:10, :5] = 5
    block[10:, 5:] = 5
    user_factors, item_factors = fit_als(sp.csr_matrix(block), TrainParams(factors=4, iterations=10), seed=0)
    scores = user_factors @ item_factors.T
    assert (scores[:10, :5].mean() > scores[:10, 5:].mean()) and (
        scores[10:, 5:].mean() > scores[10:, :5].mean()
    )


@pytest.mark.parametrize(
    "matrix, message",
    [
        (sp.csr_matrix((0, 5), dtype=np.float32), "empty"),
        (sp.csr_matrix((3, 5), dtype=np.float32), "no entries"),
        (sp.csr_matrix(np.array([[1.0, np.nan]], dtype=np.float32)), "NaN or inf"),
        (sp.csr_matrix(np.array([[1.0, -2.0]], dtype=np.float32)), "negative"),
    ],
)
def test_unusable_confidence_is_refused(matrix, message):
    with pytest.raises(ValueError, match=message):
        fit_als(matrix, SMALL, seed=0)


def test_factor_checks():
    good = np.zeros((3, 2), np.float32)
    check_factors(good, good, 3, 3, 2)
    bad = good.copy()
    bad[1, 0] = np.nan
    with pytest.raises(FitError, match="1 rows contain NaN"):
        check_factors(bad, good, 3, 3, 2)
    with pytest.raises(FitError, match="shape"):
        check_factors(good, good, 4, 3, 2)
    with pytest.raises(FitError, match="float32"):
        check_factors(good.astype(np.float64), good, 3, 3, 2)


@pytest.mark.skipif(gpu_available(), reason="only meaningful without CUDA")
def test_gpu_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no usable CUDA"):
        fit_als(random_confidence(), SMALL, seed=0, device="gpu")


def test_recommender_from_factors_uses_saved_factors():
    user_factors = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    item_factors = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], np.float32)
    model = recommender_from_factors(user_factors, item_factors)
    liked = sp.csr_matrix(np.array([[1, 0, 0], [0, 0, 0]], np.float32))
    ids, scores = model.recommend(np.arange(2), liked, N=2)
    assert ids.tolist() == [[2, 1], [1, 2]]
    np.testing.assert_allclose(scores, [[1.0, 0.0], [3.0, 1.0]])


def test_params_from_mapping_and_toml(tmp_path):
    params = TrainParams.from_mapping(
        {"factors": 16, "scaling": "bm25", "event_weights": {"cart": 3}, "seed": 5}
    )
    assert params.factors == 16 and params.scaling == "bm25"
    assert params.event_weights["cart"] == 3.0 and params.event_weights["view"] == 1.0
    with pytest.raises(ValueError, match="unknown parameter 'factor'"):
        TrainParams.from_mapping({"factor": 3}, source="x.toml")
    with pytest.raises(ValueError, match="x.toml: factors has an invalid value"):
        TrainParams.from_mapping({"factors": 2.5}, source="x.toml")
    config = tmp_path / "model.toml"
    config.write_text('factors = 32\nscaling = "log"\nhalf_life_days = 30\n[event_weights]\npurchase = 20\n')
    loaded = TrainParams.from_toml(config)
    assert (loaded.factors, loaded.scaling, loaded.half_life_days, loaded.event_weights["purchase"]) == (
        32,
        "log",
        30.0,
        20.0,
    )
    config.write_text("factors = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        TrainParams.from_toml(config)
    manifest = loaded.to_manifest(seed=9)
    assert manifest["seed"] == 9 and TrainParams.from_mapping(manifest) == loaded
