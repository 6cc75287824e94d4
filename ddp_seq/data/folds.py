"""k-fold splits of ``n`` samples from a seed alone: plain, stratified by class, or by group.

The same seed gives the same folds on any world size and in any process, so every rank of a job
(and a resumed job) agrees on them without talking. Pure NumPy, no config: the built-in readers'
``data.folds`` and :func:`ddp_seq.train.cross_validation.cross_validate` both split with it.
"""

from __future__ import annotations

import numpy as np


def fold_assignment(n: int, folds: int, seed: int, strata: np.ndarray | None = None,
                    groups: np.ndarray | None = None) -> np.ndarray:
    """The fold (0-based) of each of ``n`` samples: the one whose validation part holds it.

    The samples, shuffled by ``seed``, are dealt to the folds in turn, so fold sizes differ by at
    most one (the first folds get the extra samples). With ``strata`` (the class of each sample)
    they are shuffled within each class and dealt class after class: every fold holds each class in
    about its overall proportion, as scikit-learn's ``StratifiedKFold`` does for classifiers. A
    class of ``c`` samples lands in ``min(c, folds)`` different folds, so a class of one sample is
    missing from the training part of the fold that validates on it, and only then.

    With ``groups`` (a group id per sample: a speaker, a patient, a document) every group lands in
    one fold, as scikit-learn's ``GroupKFold``: the groups, shuffled by ``seed``, go largest first
    to the fold that holds the fewest samples so far (``strata`` is then not used).

    Raises:
        ValueError: ``folds`` < 2, more folds than samples (or than groups), or ``strata`` /
            ``groups`` not of length ``n``.
    """
    if folds < 2 or folds > n:
        raise ValueError(f"folds should be in [2, {n}] for {n} samples, got {folds}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        return _by_group(np.asarray(groups), n, folds, rng)
    if strata is None:
        order = rng.permutation(n)
    else:
        strata = np.asarray(strata)
        if len(strata) != n:
            raise ValueError(f"strata should hold one class per sample ({n}), got {len(strata)}")
        order = np.concatenate([rng.permutation(np.flatnonzero(strata == c)) for c in np.unique(strata)])
    assigned = np.empty(n, dtype=np.int64)
    assigned[order] = np.arange(n) % folds
    return assigned


def _by_group(groups: np.ndarray, n: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    if len(groups) != n:
        raise ValueError(f"groups should hold one group per sample ({n}), got {len(groups)}")
    names, members = np.unique(groups, return_inverse=True)
    if len(names) < folds:
        raise ValueError(f"{len(names)} groups cannot fill {folds} folds (each group stays in one fold)")
    sizes = np.bincount(members)
    shuffled = rng.permutation(len(names))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]  # largest first; ties in shuffled order
    fold_of_group = np.empty(len(names), dtype=np.int64)
    filled = np.zeros(folds, dtype=np.int64)
    for group in order:
        fold = int(np.argmin(filled))  # the emptiest fold; the lowest index among equals
        fold_of_group[group] = fold
        filled[fold] += sizes[group]
    return fold_of_group[members]


def fold_indices(n: int, folds: int, fold: int, seed: int, strata: np.ndarray | None = None,
                 groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sample indices of fold ``fold`` of ``folds`` (:func:`fold_assignment`); sorted,
    like the hold-out."""
    assigned = fold_assignment(n, folds, seed, strata, groups)
    return np.flatnonzero(assigned != fold), np.flatnonzero(assigned == fold)
