"""Confirmation of near-duplicate candidates from their thumbnails: one picture, altered, or two pictures?

A candidate pair (a, b) is aligned, then compared. Alignment assumes that one is a crop of the other (a
resize or a re-encode is the empty crop): a sub-rectangle of a's view, with a margin of up to `max_margin`
of the side cut from each side, resampled onto b's grid. Its four margins come from matching the column and
row means (1-D profiles) over a grid of margins, refined by a coordinate descent on the 2-D correlation. Both
directions (b inside a, a inside b) and the four pairings of the two views (frame, content) are tried; the
pairing judged is, of those that pass every test (else of all), the one with the smallest local residual.

Before comparing, b is blurred to the resolution of a's region mapped onto it: a crop's view is a zoom, and
holds detail (stripes, text, texture) that its original's view had averaged away.

The comparison tolerates what alterations do and nothing more:
- luma: b as gain × a + offset, clipped to the levels as a brighter or more contrasted copy clips, and fitted
  without the clipped pixels (its whites say nothing of the gain); scored as a correlation (the share of b's
  variance explained: Pearson's r when nothing clips), so a brightness and contrast change costs nothing,
  within a gain of `max_contrast_change` (grey on white is not black on white made lighter); and the
  largest residual of a 4×4 grid of blocks, relative to b's contrast, so that a different emblem on the
  same folder (a local change the global correlation barely sees) is refused;
- colour: a's chroma is taken through luma's gain and offset in RGB, each channel clipped, as a brighter
  copy's channels clip (a light blue sky turns white); Cb and Cr deviations from grey may then scale by a
  further common gain in [0.7, 1.4] (saturation), not change hue: a blue folder is not a green one.
  Judged by the worst block too, relative to the picture's saturation, so that a small object of another
  colour on the same background counts;
- the views' aspect ratios may differ by `max_aspect_change` (a crop changes it a little, a squashed
  different picture a lot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from pipeline.thumbnails import Thumbnails

MARGIN_STEP = 0.0125  # of the side: 0.4 px of a 32-px view
BLOCKS = 4  # the local residual's grid, per side
CONTRAST_FLOOR = 4.0  # grey levels added to b's contrast, so that flat pictures do not divide by ~0
GAIN_RANGE = (0.7, 1.4)
COLOUR_FLOOR = 8.0  # chroma levels added to b's saturation: a grey picture is judged on absolute hue shifts
REFINE_ROUNDS = 2
HOPELESS_BELOW = 0.25  # short of min_correlation after the profile fit: no pair of the real-image bench got back
BIG = np.float32(1e6)
FLAT_VARIANCE = 1e-5  # of a profile's mean square: float32 rounding of the quadratic form lies below
# Resolution matching (Matcher._match_resolution): the blur variance of one view pixel, a box of one pixel (1/12)
# and _smooth's Gaussian (σ 1 for luma at 32 px, 0.5 for chroma at 16 px).
LUMA_BLUR_VARIANCE, CHROMA_BLUR_VARIANCE = 1 + 1 / 12, 0.25 + 1 / 12
BLUR_STEP = 0.05  # px of σ between the tabulated blurs
# Clipping (_clipped_fit): luma levels at or beyond these count as clipped; the share of pixels a fit needs.
CLIP_LEVELS, MIN_FIT_SHARE = (4.0, 251.0), 0.4  # 0.2 let a fit on a few strokes call a grey fill white
CHUNK = 2048  # pairs compared at once: memory stays at a few MB per thousand pairs


@dataclass(frozen=True)
class Tolerances:
    max_margin: float = 0.3
    min_correlation: float = 0.9
    max_block_residual: float = 0.4
    max_colour_residual: float = 0.4
    max_aspect_change: float = 1.5
    max_contrast_change: float = 2.0
    flips: bool = False


@dataclass
class PairScores:
    correlation: np.ndarray
    block_residual: np.ndarray
    colour_residual: np.ndarray
    contrast_change: np.ndarray
    aspect_change: np.ndarray

    def accepted(self, tol: Tolerances) -> np.ndarray:
        return (
            (self.correlation >= tol.min_correlation)
            & (self.block_residual <= tol.max_block_residual)
            & (self.colour_residual <= tol.max_colour_residual)
            & (self.contrast_change <= tol.max_contrast_change)
            & (self.aspect_change <= tol.max_aspect_change)
        )

    @classmethod
    def concat(cls, parts: list[PairScores]) -> PairScores:
        if not parts:
            return cls(*(np.zeros(0, np.float32) for _ in cls.__dataclass_fields__))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


def _interpolation(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """(..., n, n): rows sample [lo, hi] (normalised) of a length-n signal by linear interpolation."""
    u = lo[..., None] + (hi - lo)[..., None] * (np.arange(n) + 0.5) / n
    p = np.clip(u * n - 0.5, 0, n - 1)
    i0 = np.floor(p).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    f = p - i0
    m = np.zeros(u.shape + (n,))
    np.put_along_axis(m, i0[..., None], (1 - f)[..., None], axis=-1)
    extra = np.zeros_like(m)
    np.put_along_axis(extra, i1[..., None], f[..., None], axis=-1)
    return (m + extra).astype(np.float32)


class Matcher:
    def __init__(self, tol: Tolerances = Tolerances()):
        self.tol = tol
        self.margins = np.arange(0, tol.max_margin + 1e-9, MARGIN_STEP)
        lo, hi = np.meshgrid(self.margins, 1 - self.margins, indexing="ij")
        self.tables = {n: _interpolation(lo, hi, n) for n in (32, 16)}  # (M, M, n, n) per side length
        self.profile_forms = _ProfileForms(self.tables[32].reshape(-1, 32, 32))
        largest = np.sqrt((1 / (1 - 2 * tol.max_margin) ** 2 - 1) * LUMA_BLUR_VARIANCE)  # both margins at the max
        self.blurs = {n: _blur_table(n, int(np.ceil(largest / BLUR_STEP)) + 1) for n in (32, 16)}  # (steps, n, n)

    # -- alignment ------------------------------------------------------------------------------------
    def _fit_axis(self, pa: np.ndarray, pb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Margins (lo, hi indexes) of a's profile that best match b's: luma profiles (P, 32), the side of
        profile_forms."""
        corr = self.profile_forms.correlations(pa, _standardise(pb, 1))
        m = len(self.margins)
        best = corr.argmax(1)
        return best // m, best % m

    def _warp(self, img: np.ndarray, p: np.ndarray) -> np.ndarray:
        table = self.tables[img.shape[-1]]
        wy, wx = table[p[:, 2], p[:, 3]], table[p[:, 0], p[:, 1]]
        if img.ndim == 4:  # chroma (P, 2, n, n)
            wy, wx = wy[:, None], wx[:, None]
        return wy @ img @ np.swapaxes(wx, -1, -2)

    def _initial(self, ya: np.ndarray, yb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P, 4) margin indexes (x lo, x hi, y lo, y hi) in a's view that map a onto b, from the profiles, and
        the 2-D correlation they give."""
        x0, x1 = self._fit_axis(ya.mean(1), yb.mean(1))
        y0, y1 = self._fit_axis(ya.mean(2), yb.mean(2))
        p = np.stack([x0, x1, y0, y1], 1)
        return p, _correlation(self._warp(ya, p), yb)

    def _refine(self, ya: np.ndarray, yb: np.ndarray, p: np.ndarray, best: np.ndarray) -> np.ndarray:
        """Coordinate descent on the 2-D correlation, one margin step at a time."""
        last = len(self.margins) - 1
        for _ in range(REFINE_ROUNDS):
            for k in range(4):
                for step in (-1, 1):
                    q = p.copy()
                    q[:, k] = np.clip(q[:, k] + step, 0, last)
                    score = _correlation(self._warp(ya, q), yb)
                    better = score > best
                    p[better], best[better] = q[better], score[better]
        return p

    # -- comparison -----------------------------------------------------------------------------------
    def _scores(self, ya, ca, yb, cb, p) -> tuple[np.ndarray, ...]:
        n = len(ya)
        sharp_b = yb.reshape(n, -1)  # clipping is judged before the blur, which lifts white's edges off the level
        yb, cb = self._match_resolution(yb, cb, p)
        a, b = self._warp(ya, p).reshape(n, -1), yb.reshape(n, -1)
        gain, offset = _clipped_fit(a, b, sharp_b)
        residual = b - np.clip(gain[:, None] * a + offset[:, None], 0, 255)
        centred_b = b - b.mean(1, keepdims=True)
        var_b = (centred_b * centred_b).mean(1)
        # The share of b's variance the clipped gain-and-offset model explains, as a correlation: Pearson's r
        # when nothing clips (the fit is then least squares over every pixel).
        explained = 1 - (residual * residual).mean(1) / (var_b + 1e-6)
        correlation = np.sign(gain) * np.sqrt(np.clip(explained, 0, 1))
        side = ya.shape[-1] // BLOCKS
        block = np.sqrt((residual.reshape(n, BLOCKS, side, BLOCKS, side) ** 2).mean(axis=(2, 4))).reshape(n, -1)
        block = block.max(1) / (np.sqrt(var_b) + CONTRAST_FLOOR)
        box = ya.shape[-1] // ca.shape[-1]
        luma_a = a.reshape(n, ca.shape[-1], box, ca.shape[-1], box).mean(axis=(2, 4))  # at chroma's side
        da = _clipped_chroma(luma_a, self._warp(ca, p), gain, offset).reshape(n, -1) - 128
        db = cb.reshape(n, -1) - 128
        colour_gain = np.clip((da * db).sum(1) / ((da * da).sum(1) + 1e-6), *GAIN_RANGE)
        chroma_side = ca.shape[-1] // BLOCKS
        colour_residual = (db - colour_gain[:, None] * da).reshape(n, 2, BLOCKS, chroma_side, BLOCKS, chroma_side)
        colour_contrast = np.sqrt((db**2).mean(1))  # deviation from grey: saturated pictures forgive more
        colour = np.sqrt((colour_residual**2).mean(axis=(1, 3, 5))).reshape(n, -1).max(1) / (
            colour_contrast + COLOUR_FLOOR
        )
        # the luma gain: a picture of grey and white is not one of black and white made lighter
        contrast = np.where(gain > 0, np.maximum(gain, 1 / np.maximum(gain, 1e-6)), np.inf)
        return correlation, block, colour, contrast

    def _match_resolution(self, yb: np.ndarray, cb: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """b blurred to the resolution of a's region mapped onto it. That region is 1/scale of a's view, so its
        32 px stand for 32/scale px of detail: a crop's view, sharper, would otherwise differ from its
        original's wherever there is detail finer than the original's pixels (stripes, text, texture)."""
        scale_x = 1 / (1 - self.margins[p[:, 0]] - self.margins[p[:, 1]])
        scale_y = 1 / (1 - self.margins[p[:, 2]] - self.margins[p[:, 3]])
        out = []
        for img, base in ((yb, LUMA_BLUR_VARIANCE), (cb, CHROMA_BLUR_VARIANCE)):
            table = self.blurs[img.shape[-1]]
            wy, wx = (table[_blur_step(s, base, len(table))] for s in (scale_y, scale_x))
            if img.ndim == 4:  # chroma (P, 2, n, n)
                wy, wx = wy[:, None], wx[:, None]
            out.append(wy @ img @ np.swapaxes(wx, -1, -2))
        return out[0], out[1]

    def compare(self, a: Thumbnails, b: Thumbnails) -> PairScores:
        """Scores of pairs (a[i], b[i]), in chunks of CHUNK pairs."""
        parts = []
        for start in range(0, len(a), CHUNK):
            rows = np.arange(start, min(start + CHUNK, len(a)))
            parts.append(self._compare(_smooth(a.take(rows)), _smooth(b.take(rows))))
        return PairScores.concat(parts)

    def _compare(self, a: Thumbnails, b: Thumbnails) -> PairScores:
        hypotheses = []  # (a's luma, a's chroma, b's luma, b's chroma, aspect change): a mapped onto b
        for flip in (False, True) if self.tol.flips else (False,):
            la, ca = (a.luma[..., ::-1], a.chroma[..., ::-1]) if flip else (a.luma, a.chroma)
            for va in (0, 1):
                for vb in (0, 1):
                    if va == vb == 1:
                        continue
                    aspect = np.maximum(a.aspect[:, va] / b.aspect[:, vb], b.aspect[:, vb] / a.aspect[:, va])
                    aspect = np.nan_to_num(aspect, nan=np.inf)
                    views = [np.ascontiguousarray(x) for x in (la[:, va], ca[:, va], b.luma[:, vb], b.chroma[:, vb])]
                    hypotheses += [(*views, aspect), (*views[2:], *views[:2], aspect)]
        n = len(a)
        fields = len(PairScores.__dataclass_fields__)
        scores = np.full((len(hypotheses), fields, n), np.inf, np.float32)
        scores[:, 0] = -1
        for h, (y1, c1, y2, c2, aspect) in enumerate(hypotheses):
            p, correlation = self._initial(y1, y2)
            # Pairs far from the bar after the profile fit do not reach it by refinement: skip them.
            hopeful = np.flatnonzero(correlation >= self.tol.min_correlation - HOPELESS_BELOW)
            if not len(hopeful):
                continue
            y1, c1, y2, c2 = (x[hopeful] for x in (y1, c1, y2, c2))
            p = self._refine(y1, y2, p[hopeful], correlation[hopeful])
            scores[h, :-1, hopeful] = np.stack(self._scores(y1, c1, y2, c2, p), 1)
            scores[h, -1, hopeful] = aspect[hopeful]
        # The hypothesis judged: of those that pass every test, else of all, the smallest local residual.
        passes = PairScores(*(scores[:, k] for k in range(fields))).accepted(self.tol)
        best = np.where(passes, scores[:, 1], scores[:, 1] + BIG).argmin(0)
        chosen = scores[best, :, np.arange(n)]  # (P, fields)
        return PairScores(*(chosen[:, k] for k in range(fields)))


class _ProfileForms:
    """The correlation of every resampling T_g @ a of a profile a with a standardised profile z, for all the
    margin pairs g at once, without resampling: z·T_g a, mean(T_g a) and |T_g a|² are linear and quadratic
    forms in a (and its outer products), so three matrix products over the pairs replace sampling and
    standardising a (G, n) array per pair (4/5 of the confirmation's time when done directly)."""

    def __init__(self, tables: np.ndarray):  # (G, n, n)
        g, n, _ = tables.shape
        self.linear = tables.reshape(g, n * n).T.astype(np.float32)  # (n², G): z_i T_gij a_j
        self.mean = (tables.sum(1).T / n).astype(np.float32)  # (n, G): 1·T_g a / n
        self.upper = np.triu_indices(n)
        gram = np.einsum("gij,gik->gjk", tables.astype(np.float64), tables.astype(np.float64))  # T_gᵀ T_g
        twice = np.where(self.upper[0] == self.upper[1], 1.0, 2.0)  # the symmetric form's upper triangle
        self.square = ((gram[:, self.upper[0], self.upper[1]] * twice).T / n).astype(np.float32)

    def correlations(self, a: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(P, G) Pearson correlations of T_g a[p] with z[p]; z standardised (mean 0, mean square 1)."""
        # Rows of every T_g sum to 1: centring a shifts each resampling by a constant, which no correlation
        # sees, and keeps |T_g a|²/n - mean² clear of cancellation.
        a = (a - a.mean(1, keepdims=True)).astype(np.float32)
        p, n = a.shape
        mean = a @ self.mean
        variance = (a[:, self.upper[0]] * a[:, self.upper[1]]) @ self.square - mean**2
        # A resampling flat to within float32's rounding of |a|² is flat: correlation 0, as when computed directly.
        flat = variance <= FLAT_VARIANCE * (a * a).mean(1, keepdims=True)
        cross = (z[:, :, None] * a[:, None, :]).reshape(p, n * n) @ self.linear
        cross -= mean * z.sum(1, keepdims=True)  # Σ z is 0 up to rounding: the exact centred product
        correlation = cross / (n * (np.sqrt(np.maximum(variance, 0)) + 1e-6))
        return np.where(flat, 0, np.clip(correlation, -1, 1)).astype(np.float32)


def _blur_table(n: int, steps: int) -> np.ndarray:
    """(steps, n, n): Gaussian blurs of σ = k·BLUR_STEP px as matrices, edges as scipy's (reflected)."""
    eye = np.eye(n)
    return np.stack([gaussian_filter1d(eye, k * BLUR_STEP, axis=0) if k else eye for k in range(steps)]).astype(
        np.float32
    )


def _blur_step(scale: np.ndarray, base_variance: float, steps: int) -> np.ndarray:
    """The blur table's index for a region scaled up by `scale`: its pixels' blur, in b's pixels, is `scale` times
    b's own (a box of one pixel and _smooth's Gaussian: `base_variance`), so b needs (scale² − 1) × that more."""
    sigma = np.sqrt(np.maximum(scale**2 - 1, 0) * base_variance)
    return np.minimum(np.round(sigma / BLUR_STEP).astype(np.int64), steps - 1)  # the table covers max_margin


def _clipped_fit(a: np.ndarray, b: np.ndarray, b_levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """b ≈ clip(gain · a + offset) for flattened views (P, n): the gain and the offset. A brighter or more
    contrasted copy clips at white (or black): its clipped pixels say nothing of the gain, so the fit leaves out
    pixels clipped in either view (the prediction then clips as the copy did). Where too few pixels are left
    (a flat picture, a few strokes on white), the fit takes them all. `b_levels`: b's pixels before any blur,
    which clipping is judged by."""
    fit = (a > CLIP_LEVELS[0]) & (a < CLIP_LEVELS[1]) & (b_levels > CLIP_LEVELS[0]) & (b_levels < CLIP_LEVELS[1])
    fit |= (fit.mean(1) < MIN_FIT_SHARE)[:, None]
    weight = fit.astype(np.float32)
    count = weight.sum(1)
    mean_a, mean_b = (weight * a).sum(1) / count, (weight * b).sum(1) / count
    da = a - mean_a[:, None]
    gain = (weight * da * (b - mean_b[:, None])).sum(1) / ((weight * da * da).sum(1) + 1e-6)
    return gain, mean_b - gain * mean_a


def _clipped_chroma(luma: np.ndarray, chroma: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(P, 2, n, n) Cb and Cr of a view whose RGB went through luma's gain and offset, each channel clipped: a
    brighter copy's light blue sky loses its blue as its blue channel clips. Without clipping this is the chroma
    times the gain (an offset moves the three channels alike, which chroma does not see)."""
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    rgb = np.stack([luma + 1.402 * cr, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.772 * cb])  # JPEG's YCbCr
    rgb = np.clip(gain[None, :, None, None] * rgb + offset[None, :, None, None], 0, 255)
    r, g, b = rgb
    return np.stack([128 - 0.168736 * r - 0.331264 * g + 0.5 * b, 128 + 0.5 * r - 0.418688 * g - 0.081312 * b], 1)


def _standardise(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.mean(axis, keepdims=True)
    return x / (np.sqrt((x * x).mean(axis, keepdims=True)) + 1e-6)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (_standardise(a, 1) * _standardise(b, 1)).mean(1)


def _smooth(t: Thumbnails) -> Thumbnails:
    """A one-pixel blur: JPEG blocking and sub-pixel misalignment stop mattering, shapes do not."""
    return Thumbnails(gaussian_filter(t.luma, (0, 0, 1, 1)), gaussian_filter(t.chroma, (0, 0, 0, 0.5, 0.5)), t.aspect)
