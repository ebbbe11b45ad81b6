"""Confirmation's margin fit: the correlations from quadratic forms are those of resampling each profile."""

import numpy as np

from pipeline.filter.confirm import Matcher, _standardise


def direct_correlations(matcher: Matcher, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, G): resample each of a's profiles at every margin pair, standardise it, correlate it with b's."""
    tables = matcher.tables[a.shape[1]].reshape(-1, a.shape[1], a.shape[1]).astype(np.float64)
    resampled = np.einsum("gij,pj->pgi", tables, a.astype(np.float64))
    return (_standardise(resampled, 2) * _standardise(b.astype(np.float64), 1)[:, None, :]).mean(2)


def test_profile_forms_give_the_correlations_of_direct_resampling():
    rng = np.random.default_rng(0)
    matcher = Matcher()
    smooth = np.cumsum(rng.normal(0, 4, (64, 32)), 1) + 128  # luma profiles: random walks around mid-grey
    a = np.concatenate([smooth, rng.uniform(0, 255, (64, 32))]).astype(np.float32)
    b = (a + rng.normal(0, 3, a.shape)).astype(np.float32)
    fast = matcher.profile_forms.correlations(a, _standardise(b, 1))
    direct = direct_correlations(matcher, a, b)
    assert fast.shape == (128, len(matcher.margins) ** 2)
    assert np.abs(fast - direct).max() < 1e-4
    assert (fast.argmax(1) == direct.argmax(1)).mean() >= 0.99


def test_a_flat_resampling_correlates_with_nothing():
    """A white background with an object at one edge: margins that cut the object away leave a flat
    profile, whose correlation is 0 (not float32's rounding noise over a vanishing variance)."""
    matcher = Matcher()
    a = np.full((2, 32), 250, np.float32)
    a[0, 30:] = 10  # an object in the last two pixels
    b = np.random.default_rng(1).uniform(0, 255, (2, 32)).astype(np.float32)
    fast = matcher.profile_forms.correlations(a, _standardise(b, 1))
    assert np.all(fast[1] == 0)  # an entirely flat profile
    m = len(matcher.margins)
    cut = [lo * m + hi for lo in range(m) for hi in range(m) if matcher.margins[hi] > 0.1]
    assert np.abs(fast[0, cut]).max() < 1e-6  # the object's pixels are outside every such resampling
    assert np.abs(fast[0]).max() > 0.05
