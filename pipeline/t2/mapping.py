"""qDESS T2 mapping (Sveinsson et al. 2017), numerically identical to DOSMA's ``generate_t2_map``.

Spec: ``shared/specs/qdess-t2.md`` §5 (formula and order of operations) and §7 (gatekeeping,
clipping and region statistics). Everything here is plain numpy on arrays; the DICOM side
lives with the inputs, in :mod:`pipeline.qdess_input`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ErrorCode, PipelineError
from ..labels import STATS, T2_LAYERS, T2_REGION_KEYS, t2_key

GAMMA_RAD_PER_G_S = 4258 * 2 * math.pi  # proton gyromagnetic ratio, DOSMA's spelling
DEFAULT_T1_MS = 1200.0  # FemoralCartilage.T1_EXPECTED; the pipeline uses it for all cartilage
DEFAULT_DIFFUSIVITY = 1.25e-9  # m^2/s
DEEP_OFFSET = 100
_CHUNK = 1 << 16  # voxels per pass: small enough to stay in cache
SUPERFICIAL_OFFSET = 200

SKIP_TAGS_REMOVED = (
    "T2 skipped: the GE private tags GL_AREA (0019,10B6) / TG (0019,10B7) were removed "
    "(often by anonymisation) — keep private group 0019 to enable T2"
)
SKIP_NOT_QDESS = (
    "T2 skipped: input is not a two-echo qDESS series (T2 needs a GE qDESS DICOM series "
    "holding both echoes, or two echo volumes with a JSON of acquisition parameters)"
)

# Field name -> accepted JSON keys (first is canonical), for the "two NIfTI echoes + JSON" path.
_JSON_KEYS: dict[str, tuple[str, ...]] = {
    "tr_ms": ("tr_ms", "tr", "RepetitionTime", "repetition_time_ms"),
    "te_ms": ("te_ms", "te", "EchoTime", "echo_time_ms"),
    "flip_angle_deg": ("flip_angle_deg", "flip_angle", "alpha", "FlipAngle"),
    "gl_area": ("gl_area", "GL_AREA", "GlArea"),
    "tg_us": ("tg_us", "tg", "TG", "Tg"),
}
_FIELD_LABELS = {
    "tr_ms": "RepetitionTime (0018,0080)",
    "te_ms": "EchoTime (0018,0081) of echo 1",
    "flip_angle_deg": "FlipAngle (0018,1314)",
    "gl_area": "GL_AREA (0019,10B6)",
    "tg_us": "TG (0019,10B7)",
}


@dataclass(frozen=True)
class QDessParams:
    """Acquisition parameters of a qDESS scan, in header units.

    ``tr_ms``/``te_ms``/``flip_angle_deg`` are NaN when the header lacks them (so a series
    can still be loaded and segmented); ``gl_area``/``tg_us`` are None when the GE private
    tags are absent. Use :attr:`can_compute_t2` / :func:`t2_skip_reason` before computing.
    """

    tr_ms: float
    te_ms: float
    flip_angle_deg: float
    gl_area: float | None
    tg_us: float | None

    @property
    def tags_present(self) -> bool:
        """Both GE spoiler tags exist (the pipeline's gate, spec §7.1)."""
        return self.gl_area is not None and self.tg_us is not None

    @property
    def low_spoiling(self) -> bool:
        """A spoiler tag is present but 0: bone_seg's low-spoiling formula applies (§5.4)."""
        return self.tags_present and (self.gl_area == 0 or self.tg_us == 0)

    @property
    def can_compute_t2(self) -> bool:
        """True when T2 can be computed the DOSMA way from these values."""
        return not self.problems()

    def problems(self) -> list[str]:
        """Human-readable reasons these values cannot drive the T2 formula (empty if fine)."""
        out = [f"{_FIELD_LABELS[n]} is missing" for n in ("gl_area", "tg_us")
               if getattr(self, n) is None]
        for name in ("tr_ms", "te_ms", "flip_angle_deg", "gl_area", "tg_us"):
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value):
                out.append(f"{_FIELD_LABELS[name]} is missing or not a finite number")
            elif value < 0:
                out.append(f"{_FIELD_LABELS[name]} must not be negative (got {value:g})")
        if not out:
            if self.tr_ms <= 0:
                out.append(f"{_FIELD_LABELS['tr_ms']} must be > 0 ms (got {self.tr_ms:g})")
            elif self.te_ms >= self.tr_ms:
                out.append(f"{_FIELD_LABELS['te_ms']} ({self.te_ms:g} ms) must be shorter "
                           f"than RepetitionTime ({self.tr_ms:g} ms)")
            if not 0 < self.flip_angle_deg <= 180:
                out.append(f"{_FIELD_LABELS['flip_angle_deg']} must be in (0, 180] degrees "
                           f"(got {self.flip_angle_deg:g})")
        return out

    def validate(self) -> QDessParams:
        """Return self, or raise ``INVALID_PARAMETERS`` naming every unusable field."""
        problems = self.problems()
        if problems:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                "cannot compute T2: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, float | None]:
        """Plain dict with the canonical JSON keys (round-trips through :meth:`from_mapping`)."""
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> QDessParams:
        """Build validated params from a mapping with the keys documented in :meth:`from_json`."""
        values: dict[str, float] = {}
        for field, keys in _JSON_KEYS.items():
            found = [k for k in keys if k in data]
            if not found:
                raise PipelineError(
                    ErrorCode.INVALID_PARAMETERS,
                    f"parameter '{field}' ({_FIELD_LABELS[field]}) is missing; "
                    f"accepted keys: {', '.join(keys)}",
                )
            values[field] = _parse_number(field, data[found[0]])
        return cls(**values).validate()

    @classmethod
    def from_json(cls, path: str | Path) -> QDessParams:
        """Read params for the "two echo volumes + JSON" input.

        Expected keys (ms, degrees, GE units): ``tr_ms``, ``te_ms`` (echo 1), ``flip_angle_deg``,
        ``gl_area``, ``tg_us`` (µs); DICOM-style aliases such as ``RepetitionTime`` also work.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                f"cannot read the T2 parameter JSON {Path(path).name}: {exc}"
                                ) from exc
        if not isinstance(data, dict):
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                "the T2 parameter JSON must be an object like "
                                '{"tr_ms": 20.36, "te_ms": 6.428, "flip_angle_deg": 20, '
                                '"gl_area": 3132, "tg_us": 2392}')
        return cls.from_mapping(data)


def _parse_number(field: str, value: object) -> float:
    # bool is an int subclass: `true` in JSON is almost certainly a mistake, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            f"parameter '{field}' must be a number (got {value!r})")
    try:
        number = float(value)
    except ValueError:
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            f"parameter '{field}' must be a number (got {value!r})") from None
    if not math.isfinite(number):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            f"parameter '{field}' must be finite (got {value!r})")
    return number


def t2_skip_reason(params: QDessParams | None, *, is_qdess: bool = True) -> str | None:
    """Why the pipeline skips T2 (spec §7.1), or None when it computes it.

    ``is_qdess=False`` (or ``params=None``) is for inputs that are not a two-echo qDESS series.
    """
    if not is_qdess or params is None:
        return SKIP_NOT_QDESS
    if params.gl_area is None and params.tg_us is None:
        return SKIP_TAGS_REMOVED
    if not params.tags_present:
        name = "GL_AREA (0019,10B6)" if params.gl_area is None else "TG (0019,10B7)"
        return (f"T2 skipped: the GE private tag {name} is missing (often removed by "
                "anonymisation) — keep private group 0019 to enable T2")
    problems = params.problems()
    if problems:
        return "T2 skipped: " + "; ".join(problems)
    return None


def low_spoiling_warning(params: QDessParams) -> str | None:
    """Warning text when a spoiler tag is 0 and the low-spoiling formula is used (§5.4)."""
    if not params.low_spoiling:
        return None
    return (f"T2 computed with the low-spoiling formula: GL_AREA={params.gl_area:g}, "
            f"TG={params.tg_us:g} µs (a zero spoiler value means no diffusion term)")


def _as_real_float64(name: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if np.iscomplexobj(arr):
        raise PipelineError(ErrorCode.INVALID_VALUES, f"{name} must be real-valued, not complex")
    return arr


def _check_pair(echo1: np.ndarray, echo2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e1 = _as_real_float64("echo 1", echo1)
    e2 = _as_real_float64("echo 2", echo2)
    if e1.shape != e2.shape:
        raise PipelineError(ErrorCode.INVALID_DIMENSIONS,
                            f"the two echoes differ in shape: {e1.shape} vs {e2.shape}")
    return e1, e2


def t2_constants(params: QDessParams, *, t1_ms: float = DEFAULT_T1_MS,
                 diffusivity: float = DEFAULT_DIFFUSIVITY) -> tuple[float, float]:
    """The formula's ``k`` and ``c1`` (spec §5.2), with DOSMA's exact float operations."""
    params.validate()
    if not (math.isfinite(t1_ms) and t1_ms > 0):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS, f"t1_ms must be > 0 (got {t1_ms})")
    if not (math.isfinite(diffusivity) and diffusivity >= 0):
        raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                            f"diffusivity must be >= 0 (got {diffusivity})")
    tr = params.tr_ms * 1e-3
    tg = params.tg_us * 1e-6
    t1 = t1_ms * 1e-3
    alpha = math.radians(params.flip_angle_deg)
    if params.low_spoiling:
        # bone_seg's fallback; identical to DOSMA with GL_AREA = 0 (dk = 0), no 0/0 on Tg = 0
        dkl = 0.0
    else:
        gl = params.gl_area / (tg * 1e6) * 100
        dkl = GAMMA_RAD_PER_G_S * gl * tg
    # numpy (not math) functions, as DOSMA calls them, so k/c1 match it to the last bit
    e = np.exp(-tr / t1 - tr * np.power(dkl, 2) * diffusivity)
    k = np.power(np.sin(alpha / 2), 2) * (1 + e) / (1 - np.cos(alpha) * e)
    c1 = (tr - tg / 3) * np.power(dkl, 2) * diffusivity
    return float(k), float(c1)


def compute_t2_map(
    echo1: np.ndarray,
    echo2: np.ndarray,
    params: QDessParams,
    *,
    t1_ms: float = DEFAULT_T1_MS,
    diffusivity: float = DEFAULT_DIFFUSIVITY,
    suppress_fat: bool = False,
    suppress_fluid: bool = False,
    beta: float = 1.2,
    nan_bounds: tuple[float, float] | None = (0, 100),
    nan_to_num: float | None = 0.0,
    decimals: int | None = 1,
) -> np.ndarray:
    """T2 map in ms (float64, same shape as the echoes), in DOSMA's order of operations (§5.3).

    Invalid voxels become ``nan_to_num`` (0). ``nan_bounds=None, nan_to_num=None,
    decimals=None`` gives the raw formula. Raises ``INVALID_PARAMETERS`` when ``params``
    cannot drive the formula (check :func:`t2_skip_reason` first).
    """
    e1, e2 = _check_pair(echo1, echo2)
    k, c1 = t2_constants(params, t1_ms=t1_ms, diffusivity=diffusivity)
    numerator = -2000 * (params.tr_ms * 1e-3 - params.te_ms * 1e-3)
    fill = None if nan_to_num is None else (
        0.0 if isinstance(nan_to_num, bool) else float(nan_to_num))  # DOSMA: bool -> 0

    t2 = np.empty(e1.shape, dtype=np.float64)
    flat, flat1, flat2 = t2.reshape(-1), e1.reshape(-1), e2.reshape(-1)
    # Every step is voxel-wise, so cache-sized chunks give the same bits ~3x faster.
    for start in range(0, flat.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        _t2_chunk(flat[part], flat1[part], flat2[part], k, c1, numerator,
                  nan_bounds, fill, decimals)

    if suppress_fat:
        # a float64 threshold makes the comparison run in float64 for any input dtype
        t2 *= e1 > 0.15 * np.float64(np.max(e1))
    if suppress_fluid:
        t2 *= _fluid_mask(e1, e2, beta)
    return t2


def _t2_chunk(out: np.ndarray, e1: np.ndarray, e2: np.ndarray, k: float, c1: float,
              numerator: float, nan_bounds: tuple[float, float] | None, fill: float | None,
              decimals: int | None) -> None:
    """Spec §5.3 steps 1-7 into ``out``, in place; each line matches DOSMA's expression."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out[...] = e2  # == ones * echo2: promoted to float64 before the division
        np.divide(out, e1, out=out)
        np.nan_to_num(out, copy=False)
        np.abs(out, out=out)
        np.divide(out, k, out=out)
        np.log(out, out=out)
        np.add(out, c1, out=out)
        np.divide(numerator, out, out=out)
        np.nan_to_num(out, copy=False)
    if nan_bounds is not None:
        lower, upper = nan_bounds
        out[(out < lower) | (out > upper)] = np.nan
    if fill is not None:
        np.nan_to_num(out, copy=False, nan=fill)
    if decimals is not None:
        np.around(out, decimals, out=out)


def _fluid_mask(e1: np.ndarray, e2: np.ndarray, beta: float) -> np.ndarray:
    # float64 so uint16 cannot wrap and float32 input gives the float64 result
    nulled = e2.astype(np.float64)
    nulled *= beta
    np.subtract(e1, nulled, out=nulled)
    return nulled > 0.1 * np.max(nulled)


def compute_rss(echo1: np.ndarray, echo2: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares sqrt(e1² + e2²) in float64 (cast before squaring, spec §4)."""
    e1, e2 = _check_pair(echo1, echo2)
    e1 = e1.astype(np.float64)
    e2 = e2.astype(np.float64)
    return np.sqrt(e1**2 + e2**2)


def clip_for_stats(t2: np.ndarray, lower: float = 0.0, upper: float = 80.0) -> np.ndarray:
    """Copy of ``t2`` with values ``<= lower`` or ``>= upper`` set to NaN (spec §7.2)."""
    out = np.array(t2, dtype=np.float64)
    out[(out <= lower) | (out >= upper)] = np.nan
    return out


def region_t2_stats(
    t2_clipped: np.ndarray,
    labels: np.ndarray,
    region_keys: Mapping[int, str] | None = None,
    suffix: str = "",
    *,
    include_counts: bool = False,
) -> dict[str, float]:
    """Per-region nanmean / nanstd (ddof=0) / nanmedian of a clipped T2 map (spec §7.3).

    Keys: ``{region}{suffix}_t2_ms_mean|_std|_median`` (plus ``_n_valid`` when
    ``include_counts``), in ``region_keys`` order. Labels absent from ``labels`` give no keys;
    a label without a valid voxel gives NaN.
    """
    region_keys = T2_REGION_KEYS if region_keys is None else region_keys
    prefixes = [(label, f"{region}{suffix}") for label, region in region_keys.items()]
    return _label_stats(t2_clipped, labels, prefixes, include_counts)


def depth_t2_stats(
    t2_clipped: np.ndarray,
    depth_labels: np.ndarray,
    region_keys: Mapping[int, str] | None = None,
    *,
    include_counts: bool = False,
) -> dict[str, float]:
    """Deep (label+100) / superficial (label+200) stats: ``{region}_deep_t2_ms_*`` etc."""
    region_keys = T2_REGION_KEYS if region_keys is None else region_keys
    prefixes = [
        (label + offset, f"{region}{T2_LAYERS[layer]}")
        for label, region in region_keys.items()
        for offset, layer in ((DEEP_OFFSET, "deep"), (SUPERFICIAL_OFFSET, "superficial"))
    ]
    return _label_stats(t2_clipped, depth_labels, prefixes, include_counts)


def _label_stats(
    t2_clipped: np.ndarray,
    labels: np.ndarray,
    prefixes: list[tuple[int, str]],
    include_counts: bool,
) -> dict[str, float]:
    t2_clipped = np.asarray(t2_clipped)
    labels = np.asarray(labels)
    if t2_clipped.shape != labels.shape:
        raise PipelineError(ErrorCode.SEG_MISMATCH,
                            f"T2 map {t2_clipped.shape} and label map {labels.shape} differ")
    # Cartilage is a small fraction of the volume: gather it once, then split per label.
    foreground = np.isin(labels, [label for label, _ in prefixes])
    values = t2_clipped[foreground].astype(np.float64, copy=False)
    fg_labels = labels[foreground]

    stats: dict[str, float] = {}
    for label, prefix in prefixes:
        selected = values[fg_labels == label]
        if selected.size == 0:
            continue
        n_valid = int(np.count_nonzero(~np.isnan(selected)))
        if n_valid:
            mean, std, median = (float(np.nanmean(selected)), float(np.nanstd(selected)),
                                 float(np.nanmedian(selected)))
        else:
            mean = std = median = math.nan  # numpy would warn "Mean of empty slice"
        stats.update({t2_key(prefix, stat): value
                      for stat, value in zip(STATS, (mean, std, median), strict=True)})
        if include_counts:
            stats[f"{prefix}_t2_ms_n_valid"] = float(n_valid)
    return stats
