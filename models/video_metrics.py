"""Temporal-consistency metrics of a video's main object, by pixel maths (no network).

The three failures the Sora-style DiT literature names, measured on one coloured object:
- colour flicker: frame-to-frame change of the object's mean colour, of the global colour
  histogram, and VBench's pixel "temporal flickering" score;
- shape morphing: variation of the object's mask area, extent and solidity over time;
- object vanishing: the fraction of frames where the object is missing;
plus motion smoothness (the centroid track against constant velocity) and what the object is:
its colour (nearest palette colour), shape (nearest reference shape) and direction of motion.

The object is the largest connected region of one palette colour: each pixel takes its nearest
palette colour if it lies within `tol` of it (RGB distance), and the colour followed is the
given one or the palette colour with the largest median region that is not the background
(covering less than `max_cover` of the frame). Frames are uint8 (T, H, W, 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Palette = dict[str, tuple[int, int, int]]


@dataclass
class Track:
    """The followed object, frame by frame (absent frames: area 0, NaN features)."""

    color: str | None
    present: np.ndarray  # (T,) bool
    area: np.ndarray  # (T,) pixels of the largest region
    centroid: np.ndarray  # (T, 2) x, y
    box: np.ndarray  # (T, 4) x0, y0, x1, y1 (exclusive)
    mean_rgb: np.ndarray  # (T, 3) the region's mean colour
    extent: np.ndarray  # (T,) area / box area
    solidity: np.ndarray  # (T,) area / convex-hull area
    offset: np.ndarray  # (T,) (centroid y - box centre y) / box height (triangles: > 0)


def nearest_colour(frames: np.ndarray, palette: Palette, tol: float) -> np.ndarray:
    """(T, H, W) index into `palette` of each pixel's nearest colour, -1 beyond `tol`."""
    colours = np.asarray(list(palette.values()), np.float32)  # (K, 3)
    out = np.empty(frames.shape[:3], np.int16)
    for t, frame in enumerate(frames):  # one frame at a time: (H, W, K) distances
        d = np.linalg.norm(frame[:, :, None, :].astype(np.float32) - colours, axis=-1)
        k = d.argmin(-1)
        out[t] = np.where(np.take_along_axis(d, k[..., None], -1)[..., 0] <= tol, k, -1)
    return out


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a (H, W) boolean mask (all False if empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask & False
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(sizes.argmax())


def region_features(region: np.ndarray) -> tuple[float, float, float]:
    """(extent, solidity, centroid offset) of one (H, W) region; the shape descriptors."""
    from skimage.measure import regionprops

    (props,) = regionprops(region.astype(np.uint8))
    y0, _, y1, _ = props.bbox
    offset = (props.centroid[0] - (y0 + y1 - 1) / 2) / max(y1 - y0, 1)
    return float(props.extent), float(props.solidity), float(offset)


def track_object(frames: np.ndarray, palette: Palette, color: str | None = None,
                 tol: float = 80.0, max_cover: float = 0.5, min_area: int = 12,
                 keep: float = 0.3) -> Track:
    """Follow the object of `color` (None: the dominant non-background palette colour).

    A frame has the object when its largest region is at least `min_area` pixels and
    `keep` x the median area of the frames that have one."""
    T, H, W, _ = frames.shape
    names = list(palette)
    labels = nearest_colour(frames, palette, tol)
    regions: dict[int, list[np.ndarray]] = {}
    candidates = [names.index(color)] if color is not None else range(len(names))
    best, best_score = None, 0.0
    for k in candidates:
        masks = labels == k
        if color is None and np.median(masks.mean(axis=(1, 2))) > max_cover:
            continue  # the background's colour
        regions[k] = [largest_region(m) for m in masks]
        score = float(np.median([r.sum() for r in regions[k]]))
        if best is None or score > best_score:
            best, best_score = k, score
    area = np.zeros(T)
    centroid, box = np.full((T, 2), np.nan), np.full((T, 4), np.nan)
    rgb, feats = np.full((T, 3), np.nan), np.full((T, 3), np.nan)
    if best is not None:
        area = np.array([r.sum() for r in regions[best]], float)
    nonzero = area[area > 0]
    ref = float(np.median(nonzero)) if len(nonzero) else 0.0
    present = (area >= min_area) & (area >= keep * ref)
    for t in np.flatnonzero(present):
        region = regions[best][t]
        ys, xs = np.nonzero(region)
        centroid[t] = xs.mean(), ys.mean()
        box[t] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        rgb[t] = frames[t][region].mean(axis=0)
        feats[t] = region_features(region)
    found = names[best] if best is not None and present.any() else None
    return Track(found, present, area, centroid, box, rgb, feats[:, 0], feats[:, 1], feats[:, 2])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x0, y0, x1, y1) boxes (exclusive ends); 0 when either is NaN."""
    if np.isnan(a).any() or np.isnan(b).any():
        return 0.0
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def histogram_change(frames: np.ndarray, bins: int = 8) -> float:
    """Mean total-variation distance (0..1) between consecutive frames' RGB histograms."""
    q = (frames.astype(np.int32) * bins // 256).reshape(len(frames), -1, 3)
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]  # (T, H*W)
    hists = np.stack([np.bincount(i, minlength=bins**3) for i in idx]) / idx.shape[1]
    return float(0.5 * np.abs(np.diff(hists, axis=0)).sum(axis=1).mean()) if len(frames) > 1 \
        else 0.0


def vbench_flicker(frames: np.ndarray) -> float:
    """VBench's temporal flickering score: (255 - mean |frame_t - frame_t-1|) / 255, 1 = still."""
    if len(frames) < 2:
        return 1.0
    mad = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean()
    return float((255.0 - mad) / 255.0)


def direction_of(track: Track, directions: dict[str, tuple[float, float]],
                 frames: int = 4) -> str | None:
    """The compass name nearest the object's initial motion (over its first `frames` steps,
    before a bounce can turn it); None when it barely moves (< 1 px per frame)."""
    ts = np.flatnonzero(track.present)
    if len(ts) < 2:
        return None
    a, b = ts[0], ts[min(frames, len(ts) - 1)]
    v = (track.centroid[b] - track.centroid[a]) / (b - a)
    if np.hypot(*v) < 1.0:
        return None
    return max(directions, key=lambda d: float(np.dot(v, directions[d])))


def shape_of(track: Track, references: dict[str, tuple[float, float, float]]) -> str | None:
    """The reference shape whose (extent, solidity, offset) is nearest the median one."""
    if not track.present.any():
        return None
    f = np.array([np.nanmedian(track.extent), np.nanmedian(track.solidity),
                  np.nanmedian(track.offset)])
    return min(references, key=lambda s: float(np.abs(f - np.asarray(references[s])).sum()))


def smoothness(track: Track, diagonal: float) -> float:
    """Median |acceleration| of the centroid over consecutive present frames, in percent of
    the frame diagonal per frame^2: 0 for constant velocity (a bounce is a rare outlier the
    median ignores); NaN with fewer than 3 consecutive frames."""
    c, p = track.centroid, track.present
    ok = p[:-2] & p[1:-1] & p[2:]
    if not ok.any():
        return math.nan
    acc = np.linalg.norm(c[2:] - 2 * c[1:-1] + c[:-2], axis=1)[ok]
    return float(100.0 * np.median(acc) / diagonal)


def consistency(frames: np.ndarray, track: Track) -> dict[str, float]:
    """The flicker / morph / vanish / smoothness numbers of one video (lower is steadier,
    except vbench_flicker, where 1 is best)."""
    p = track.present
    both = p[1:] & p[:-1]
    colour = np.linalg.norm(np.diff(track.mean_rgb, axis=0), axis=1)[both]
    area = track.area[p]
    return {
        "vanish": float(1.0 - p.mean()),
        "color_flicker": float(colour.mean()) if len(colour) else math.nan,
        "hist_flicker": histogram_change(frames),
        "vbench_flicker": vbench_flicker(frames),
        "area_cv": float(area.std() / area.mean()) if len(area) else math.nan,
        "extent_std": float(np.nanstd(track.extent[p])) if p.any() else math.nan,
        "solidity_std": float(np.nanstd(track.solidity[p])) if p.any() else math.nan,
        "morph": (float(area.std() / area.mean() + np.nanstd(track.extent[p])
                        + np.nanstd(track.solidity[p])) if p.any() else math.nan),
        "jerk": smoothness(track, math.hypot(*frames.shape[1:3])),
    }
