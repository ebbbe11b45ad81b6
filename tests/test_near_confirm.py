"""Confirmation: the margin fit's correlations from quadratic forms are those of resampling each profile; a crop
is compared at its original's resolution; a brighter copy's clipped whites do not count against it."""

import os

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from pipeline.filter.confirm import Matcher, _clipped_fit, _standardise
from pipeline.thumbnails import Thumbnails, make_thumbnail

SITE = os.path.dirname(os.path.dirname(matplotlib.__file__))
PHOTOS = [  # real photos that installed packages ship
    "sklearn/datasets/images/china.jpg",
    "sklearn/datasets/images/flower.jpg",
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
]


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


def _stored(image: Image.Image) -> Image.Image:
    """At the crawl's 256 px on the long side."""
    scale = 256 / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def _pair(a: Image.Image, b: Image.Image) -> tuple[Thumbnails, Thumbnails]:
    t = Thumbnails.decode([make_thumbnail(_stored(a)), make_thumbnail(_stored(b))])
    return t.take(np.array([0])), t.take(np.array([1]))


@pytest.mark.parametrize("photo", PHOTOS)
def test_a_crop_is_compared_at_its_originals_resolution(photo, monkeypatch):
    """A 10% crop's 32-px view holds detail that its original's view blurred away: compared as they are, the
    residual is that detail (measured: block residual 0.11-0.23 without matching, 0.08-0.16 with)."""
    image = Image.open(os.path.join(SITE, photo)).convert("RGB")
    w, h = image.size
    a, b = _pair(image, image.crop((round(0.1 * w), round(0.1 * h), round(0.9 * w), round(0.9 * h))))
    matcher = Matcher()
    matched = matcher.compare(a, b)
    monkeypatch.setattr(Matcher, "_match_resolution", lambda self, yb, cb, p: (yb, cb))
    unmatched = matcher.compare(a, b)
    assert matched.accepted(matcher.tol)[0]
    assert matched.block_residual[0] < 0.9 * unmatched.block_residual[0]
    assert matched.block_residual[0] < 0.2


def test_a_brighter_copy_clipped_at_white_is_fitted_without_its_clipped_pixels():
    rng = np.random.default_rng(0)
    a = rng.uniform(60, 250, (3, 1024)).astype(np.float32)
    b = np.clip(1.2 * a + 5, 0, 255)  # 40% of the pixels clip at white
    gain, offset = _clipped_fit(a, b, b)
    assert np.allclose(gain, 1.2, atol=1e-3) and np.allclose(offset, 5, atol=0.1)
    assert np.abs(np.clip(gain[:, None] * a + offset[:, None], 0, 255) - b).max() < 0.01
    plain = ((a - a.mean(1, keepdims=True)) * (b - b.mean(1, keepdims=True))).mean(1) / a.var(1)
    assert plain.max() < 1.1  # least squares over every pixel takes the clipped ones for a lower gain


def test_a_real_photo_made_20_percent_brighter_is_the_same_picture(monkeypatch):
    """Its sky clips at white (measured: block residual 0.16 fitted over every pixel, 0.10 without the clipped)
    and its light blue loses its blue as the blue channel clips (colour residual 0.49 from the chroma scaled as
    it is, 0.32 from the chroma of the clipped RGB; the tolerance is 0.4)."""
    import pipeline.filter.confirm as confirm

    image = Image.open(os.path.join(SITE, PHOTOS[0])).convert("RGB")
    a, b = _pair(image, ImageEnhance.Brightness(image).enhance(1.2))
    matcher = Matcher()
    scores = matcher.compare(a, b)
    assert scores.accepted(matcher.tol)[0]
    assert scores.correlation[0] > 0.97 and 1.1 < scores.contrast_change[0] < 1.3
    monkeypatch.setattr(confirm, "_clipped_chroma", lambda luma, chroma, gain, offset: chroma)  # no channel clips
    assert matcher.compare(a, b).colour_residual[0] > matcher.tol.max_colour_residual
    monkeypatch.setattr(confirm, "CLIP_LEVELS", (-np.inf, np.inf))  # every pixel in the fit
    assert scores.block_residual[0] < 0.75 * matcher.compare(a, b).block_residual[0]
