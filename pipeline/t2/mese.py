"""MESE T2: the mono-exponential fit S(TE) = S0 · exp(−TE / T2), every voxel at once.

Spec: ``shared/specs/mese-t2.md``. The log-linear fit (closed-form weighted least squares on
log S, weights S²) gives the start; Levenberg–Marquardt on (S0, R = 1/T2) refines it, each step a
2×2 solve per voxel, batched over chunks of voxels (no Python loop over voxels). Echo 1 is
dropped by default: stimulated echoes from imperfect refocusing lengthen the apparent decay at
the first echo (the OAI analyses fit echoes 2..N). Voxels whose fit fails, whose R² is below
``r2_min`` or whose T2 lies outside (0, ``t2_max_ms``] are NaN in the map and counted.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import ErrorCode, PipelineError

MODEL = "S(TE) = S0 * exp(-TE / T2), no offset term"
METHOD = "log-linear start (weights S^2), then Levenberg-Marquardt on (S0, 1/T2)"
ECHO_CHOICES = ("2-N", "all")
MIN_FIT_ECHOES = 3  # two points always fit an exponential exactly: R² would mean nothing

# Voxel status codes (the map's mask), in the order they are decided.
VALID, NO_SIGNAL, FIT_FAILED, OUT_OF_RANGE, LOW_R2 = 0, 1, 2, 3, 4
STATUS_NAMES = {VALID: "valid", NO_SIGNAL: "no_signal", FIT_FAILED: "fit_failed",
                OUT_OF_RANGE: "t2_out_of_range", LOW_R2: "r2_below_min"}

_RATE_LIMITS = (1e-6, 10.0)  # 1/ms: T2 kept in [0.1 ms, 1e6 ms] while iterating (no overflow)
_CHUNK = 1 << 15  # voxels per batch: its (voxels × echoes) float64 arrays stay in cache


@dataclass(frozen=True)
class FitSettings:
    """How the MESE fit is done and gated (all recorded in the provenance)."""

    echoes: str = "2-N"  # "2-N" drops echo 1; "all" keeps it
    r2_min: float = 0.8
    t2_max_ms: float = 100.0
    max_iter: int = 50
    tol: float = 1e-10  # relative step size that counts as converged

    def __post_init__(self) -> None:
        if self.echoes not in ECHO_CHOICES:
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                f"mese echoes must be one of {', '.join(ECHO_CHOICES)}")
        if not (0 <= self.r2_min <= 1 and self.t2_max_ms > 0 and self.max_iter >= 0):
            raise PipelineError(ErrorCode.INVALID_PARAMETERS,
                                "MESE fit: r2_min must be in [0, 1], t2_max_ms > 0")

    def echo_indices(self, n_echoes: int) -> list[int]:
        """0-based indices of the echoes fitted; refuses (INVALID_ECHOES) fewer than 3."""
        used = list(range(1 if self.echoes == "2-N" else 0, n_echoes))
        if len(used) < MIN_FIT_ECHOES:
            raise PipelineError(
                ErrorCode.INVALID_ECHOES,
                f"{n_echoes} echoes leave {len(used)} to fit with --mese-echoes {self.echoes}; "
                f"the fit needs at least {MIN_FIT_ECHOES}"
                + (" (use --mese-echoes all to keep echo 1)" if self.echoes == "2-N" else ""))
        return used

    def record(self, echo_times_ms: tuple[float, ...]) -> dict:
        """The provenance of a fit with these settings on these echo times."""
        used = self.echo_indices(len(echo_times_ms))
        return {
            "model": MODEL, "method": METHOD, "echoes": self.echoes,
            "echo_times_ms": list(echo_times_ms),
            "echoes_used": [i + 1 for i in used],
            "echo_times_used_ms": [echo_times_ms[i] for i in used],
            "r2_min": self.r2_min, "t2_bounds_ms": [0.0, self.t2_max_ms],
            "t2_bounds_rule": "0 < T2 <= upper", "max_iter": self.max_iter,
        }


@dataclass
class MeseFit:
    """Per-voxel results (the input's spatial shape, float64): ``t2_ms`` is NaN where
    ``status`` is not ``VALID``; ``r2`` and ``s0`` are NaN where the fit failed."""

    t2_ms: np.ndarray
    r2: np.ndarray
    s0: np.ndarray
    status: np.ndarray  # uint8 status codes (STATUS_NAMES)
    echoes_used: tuple[int, ...]  # 1-based
    echo_times_used_ms: tuple[float, ...]

    def counts(self, where: np.ndarray | None = None) -> dict[str, int]:
        """Voxels per status (all voxels, or those where ``where`` is true)."""
        status = self.status if where is None else self.status[where]
        found = np.bincount(status.ravel(), minlength=len(STATUS_NAMES))
        return {name: int(found[code]) for code, name in STATUS_NAMES.items()}


def loglinear_fit(signal: np.ndarray, te_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form weighted least squares of log S = log S0 − R·TE (weights S², the inverse
    variance of log S); ``signal`` is (voxels, echoes). Returns (S0, R in 1/ms); NaN where
    fewer than two echoes are positive."""
    y = np.asarray(signal, dtype=np.float64)
    te = np.asarray(te_ms, dtype=np.float64)
    positive = y > 0
    w = np.where(positive, y * y, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logy = np.where(positive, np.log(np.where(positive, y, 1.0)), 0.0)
        sw = w.sum(1)
        swx = w @ te
        swxx = w @ (te * te)
        swy = (w * logy).sum(1)
        swxy = (w * logy) @ te
        det = sw * swxx - swx * swx
        slope = (sw * swxy - swx * swy) / det
        intercept = (swy - slope * swx) / sw
    bad = (positive.sum(1) < 2) | ~np.isfinite(slope) | ~np.isfinite(intercept) | (det <= 0)
    s0 = np.where(bad, np.nan, np.exp(np.where(bad, 0.0, intercept)))
    return s0, np.where(bad, np.nan, -slope)


def nlls_fit(signal: np.ndarray, te_ms: np.ndarray, s0: np.ndarray, rate: np.ndarray, *,
             max_iter: int = 50, tol: float = 1e-10
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg–Marquardt least squares of S = S0·exp(−R·TE) from (``s0``, ``rate``), all
    voxels at once (``signal`` is (voxels, echoes)). Returns (S0, R, converged). R is the
    better-conditioned unknown than T2 (the model is smooth in it, also near R = 0)."""
    y = np.asarray(signal, dtype=np.float64)
    te = np.asarray(te_ms, dtype=np.float64)
    s0 = np.array(s0, dtype=np.float64)
    rate = np.clip(np.array(rate, dtype=np.float64), *_RATE_LIMITS)
    n = y.shape[0]
    converged = np.zeros(n, dtype=bool)
    start_ok = np.isfinite(s0) & np.isfinite(rate)
    lam = np.full(n, 1e-3)
    decay = np.exp(-np.outer(rate, te))
    cost = np.where(start_ok, ((y - s0[:, None] * decay) ** 2).sum(1), np.inf)
    active = np.flatnonzero(start_ok)
    for _ in range(max_iter):
        if active.size == 0:
            break
        ya, sa, ra, la, da = y[active], s0[active], rate[active], lam[active], decay[active]
        resid = ya - sa[:, None] * da
        j1 = -te * sa[:, None] * da  # d f / d R; d f / d S0 is the decay itself
        a, b, c = (da * da).sum(1), (da * j1).sum(1), (j1 * j1).sum(1)
        g0, g1 = (da * resid).sum(1), (j1 * resid).sum(1)
        a_d, c_d = a * (1 + la), c * (1 + la)  # Marquardt: damp the diagonal, scale-free
        with np.errstate(divide="ignore", invalid="ignore"):
            det = a_d * c_d - b * b
            step0 = (c_d * g0 - b * g1) / det
            step1 = (a_d * g1 - b * g0) / det
        ok = np.isfinite(step0) & np.isfinite(step1)
        new_s = sa + np.where(ok, step0, 0.0)
        new_r = np.clip(ra + np.where(ok, step1, 0.0), *_RATE_LIMITS)
        new_decay = np.exp(-np.outer(new_r, te))
        new_cost = ((ya - new_s[:, None] * new_decay) ** 2).sum(1)
        cost_before = cost[active]
        better = ok & (new_cost <= cost_before)
        s0[active] = np.where(better, new_s, sa)
        rate[active] = np.where(better, new_r, ra)
        decay[active] = np.where(better[:, None], new_decay, da)
        cost[active] = np.where(better, new_cost, cost[active])
        lam[active] = np.where(better, la * 0.1, la * 10.0)
        # The step taken (a rate at its limit moves no further): done when it is too small to
        # matter or the cost no longer falls, or when no step helps even when tiny.
        small = (np.abs(new_s - sa) <= tol * np.abs(sa)) & (np.abs(new_r - ra) <= tol * ra)
        stalled = better & (cost_before - new_cost <= tol * cost_before)
        # A rate pushed to its limit is out of any T2 range: no point refining it further.
        at_limit = (new_r <= _RATE_LIMITS[0]) | (new_r >= _RATE_LIMITS[1])
        done = (better & (small | stalled | at_limit)) | (lam[active] > 1e12) | ~ok
        converged[active[done & ok]] = True
        active = active[~done]
    return s0, rate, converged


def _fit_chunk(y: np.ndarray, te: np.ndarray, settings: FitSettings
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(T2, R², S0, status) of one batch of voxels; ``y`` is (voxels, echoes) float64."""
    no_signal = (y > 0).sum(1) < 2
    s0, rate = loglinear_fit(y, te)
    s0, rate, converged = nlls_fit(y, te, s0, rate, max_iter=settings.max_iter,
                                   tol=settings.tol)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t2 = 1.0 / rate
        fitted = s0[:, None] * np.exp(-np.outer(rate, te))
        ss_res = ((y - fitted) ** 2).sum(1)
        ss_tot = ((y - y.mean(1, keepdims=True)) ** 2).sum(1)
        r2 = 1.0 - ss_res / ss_tot
    failed = ~converged | ~np.isfinite(t2) | ~np.isfinite(s0) | (s0 <= 0) | ~np.isfinite(r2)
    # A clipped rate is the bound, not an estimate: outside (0, t2_max] in any sensible setting.
    out_of_range = (t2 <= 0) | (t2 > settings.t2_max_ms) | (rate <= _RATE_LIMITS[0]) | (
        rate >= _RATE_LIMITS[1])
    status = np.select([no_signal, failed, out_of_range, r2 < settings.r2_min],
                       [NO_SIGNAL, FIT_FAILED, OUT_OF_RANGE, LOW_R2], VALID).astype(np.uint8)
    t2 = np.where(status == VALID, t2, np.nan)
    r2 = np.where(failed | no_signal, np.nan, r2)
    # S0 of a rate at its limit is no estimate (and may overflow float32 when written).
    s0 = np.where(failed | no_signal | out_of_range, np.nan, s0)
    return t2, r2, s0, status


def fit_mese(echoes: np.ndarray, echo_times_ms, settings: FitSettings | None = None, *,
             threads: int | None = None) -> MeseFit:
    """Fit every voxel of ``echoes`` ((echoes, *spatial) array, one volume per TE in
    ``echo_times_ms`` order) with ``settings``; batches run on ``threads`` threads (default:
    one per available core, at most 4; numpy releases the GIL in the array operations)."""
    settings = settings or FitSettings()
    te_all = np.asarray(echo_times_ms, dtype=np.float64)
    data = np.asarray(echoes)
    if data.ndim < 2 or data.shape[0] != te_all.size:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"{data.shape[0] if data.ndim else 0} echo volumes for "
                            f"{te_all.size} echo times")
    if np.any(np.diff(te_all) <= 0) or te_all[0] <= 0:
        raise PipelineError(ErrorCode.INVALID_ECHOES,
                            f"echo times must be positive and increasing (got {te_all.tolist()})")
    used = settings.echo_indices(te_all.size)
    te = te_all[used]
    shape = data.shape[1:]
    flat = data[used].reshape(len(used), -1)
    n = flat.shape[1]
    t2, r2, s0 = (np.empty(n) for _ in range(3))
    status = np.empty(n, dtype=np.uint8)

    def run(start: int) -> None:
        part = slice(start, min(start + _CHUNK, n))
        y = np.ascontiguousarray(flat[:, part].T, dtype=np.float64)
        t2[part], r2[part], s0[part], status[part] = _fit_chunk(y, te, settings)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = threads or max(1, min(4, cores or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, range(0, n, _CHUNK)))
    return MeseFit(t2.reshape(shape), r2.reshape(shape), s0.reshape(shape),
                   status.reshape(shape), tuple(i + 1 for i in used), tuple(te.tolist()))
