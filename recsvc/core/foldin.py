"""Fold-in: a user's factor vector solved from their history against fixed item factors.

This is the real-time half of ALS. Training fits user and item factors together; serving keeps the
item factors of the live version fixed and, for a user with events newer than the model (or a
visitor the model has never seen), solves the one least-squares problem implicit solves for that
user in every ALS sweep -- the math of ``AlternatingLeastSquares.recalculate_user`` in implicit
0.7.3::

    C_u = alpha * c_u                              (effective confidence of the user's items)
    A   = Y^T Y + regularization * I + sum_i (C_ui - 1) y_i y_i^T
    b   = sum_i C_ui y_i                           (p_ui = 1 for every item with C_ui > 0)
    x_u = A^-1 b

``c_u`` is the user's confidence row before alpha, built by :mod:`recsvc.core.weighting` (the same
code that builds the training matrix) from the parameters recorded in ``manifest["params"]``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

# ------------------------------------------------------------------------------------------------
# The solve
# ------------------------------------------------------------------------------------------------


def gramian(item_factors: np.ndarray) -> np.ndarray:
    """``Y^T Y`` in float64: computed once per model version and reused by every fold-in."""
    y = np.asarray(item_factors)
    return y.T.astype(np.float64) @ y.astype(np.float64)


def fold_in(
    item_factors: np.ndarray,
    item_indices: np.ndarray,
    confidences: np.ndarray,
    regularization: float,
    alpha: float,
    yty: np.ndarray | None = None,
) -> np.ndarray:
    """Solve one user's factors against fixed item factors, as implicit's ``recalculate_user``.

    Parameters
    ----------
    item_factors : numpy.ndarray
        ``(n_items, factors)`` item factors of the model.
    item_indices : numpy.ndarray
        Unique item indices of the user's row.
    confidences : numpy.ndarray
        The row's confidences *before* alpha (as in ``interactions.npz``). As in implicit, a
        negative value means "disliked with confidence ``|c|``": it weighs in ``A`` but not ``b``.
    regularization, alpha : float
        The model's ``manifest["params"]``.
    yty : numpy.ndarray, optional
        :func:`gramian` of ``item_factors``; pass the cached one, computing it costs
        ``O(n_items * factors^2)``.

    Returns
    -------
    numpy.ndarray
        float32 ``(factors,)``; all zeros for an empty row (implicit's answer for a user without
        items).

    Raises
    ------
    ValueError
        Mismatched lengths, indices out of range or repeated, or non-finite confidences.
    """
    factors = np.asarray(item_factors)
    n_items, n_factors = factors.shape
    indices = np.asarray(item_indices, dtype=np.intp)
    conf = np.asarray(confidences, dtype=np.float64)
    if indices.shape != conf.shape or indices.ndim != 1:
        raise ValueError(f"item_indices {indices.shape} and confidences {conf.shape}: need equal 1-d shapes")
    if len(indices) == 0:
        return np.zeros(n_factors, dtype=np.float32)
    if indices.min() < 0 or indices.max() >= n_items:
        raise ValueError(f"item index out of range 0..{n_items - 1}")
    if not np.isfinite(conf).all():
        raise ValueError("confidences must be finite")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("item_indices must not repeat (sum a user's events per item first)")
    if yty is None:
        yty = gramian(factors)

    # implicit multiplies the whole row by alpha, in float32, before solving.
    effective = (np.float32(alpha) * conf.astype(np.float32)).astype(np.float64)
    y_u = factors[indices].astype(np.float64)
    magnitude = np.abs(effective)
    a = yty + regularization * np.eye(n_factors)
    a += (y_u.T * (magnitude - 1.0)) @ y_u
    b = y_u.T @ np.where(effective > 0, effective, 0.0)
    try:
        x = scipy.linalg.solve(a, b, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        # Only reachable with regularization 0 and a rank-deficient problem; the minimum-norm
        # solution is the sensible answer there (implicit raises instead).
        x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x.astype(np.float32)
