"""Anatomy and motion of the simulated apical echocardiography views (2CH / 4CH).

Coordinates
-----------
* **World** (mm): ``X`` lateral (positive to the image right), ``Y`` depth from the sector apex (the probe), so the
  probe is at the top of the image as a clinician sees it.
* **LV frame** (mm): origin at the endocardial apex ``A`` of the reference (ED) configuration, ``l`` along the long
  axis (towards the base, i.e. deeper), ``r`` across it (positive to the image right when the axis is not tilted).

Shapes
------
The reference (ED) configuration is built from ellipses in the LV frame: the endocardium is an ellipse centred at
``l = c L`` with semi-axes ``(c L, R)`` truncated at the mitral plane ``l = L``; the epicardium is the confocal-like
ellipse with semi-axes ``(c L + h_a, R + h)``; the LA is an ellipse below the mitral plane whose top chord meets the
annulus points. Each side (``r < 0`` / ``r >= 0``) has its own width and wall thickness.

Motion
------
``Φ_t`` maps reference LV-frame points ``(l, r)`` to frame ``t``. It is the composition of

1. a *lateral* map at fixed reference ``l``: ``r -> sign(r) f_l(|r|)``, piecewise linear in ``|r|`` with knots at the
   endocardium, epicardium and ``Λ`` mm outside it (identity beyond), which moves the endocardium inwards and
   thickens the wall (blended into an LA map below the mitral plane, where the atrium expands in systole);
2. a *longitudinal* map at fixed deformed ``r'``: ``l -> g_{r'}(l)``, piecewise linear in ``l`` with knots at the
   epicardial apex (fixed point), the endocardial apex, the pathological segment, the base and the LA roof
   (fixed point): the apical cap thickens, the LV shortens towards the apex, the LA stretches.

Both steps are monotone piecewise-linear functions whose knots and values are known, so ``Φ_t`` and ``Φ_t^{-1}`` are
exact and cheap; labels at frame ``t`` are the reference labels pulled back through ``Φ_t^{-1}`` and the dense
displacement between frames ``a`` and ``b`` is ``Φ_b(Φ_a^{-1}(x)) - x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EchoAnatomy", "sample_patient_params", "sample_view_params", "contraction", "LABELS"]

LABELS = {"background": 0, "LV": 1, "Myo": 2, "LA": 3}

# Width (mm) over which the lateral deformation decays to the identity outside the epicardium / LA wall.
_LAMBDA = 12.0
# Half-width (mm) of the band around the mitral plane where the LV lateral map blends into the LA map.
_BLEND = 3.0
# Width (mm) of the ramp that switches the longitudinal motion off far from the heart (lungs, chest).
_RAMP = 15.0


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _pl_eval(x: np.ndarray, knots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Evaluate per-element piecewise-linear maps; identity outside ``[knots[..., 0], knots[..., -1]]``.

    ``x`` (N,); ``knots`` and ``values`` are (N, K) per element or (K,) shared by all elements, ascending along K
    with equal first/last entries (the maps are the identity at both ends). Zero-length segments select no point,
    so degenerate knots are allowed.
    """

    def col(arr: np.ndarray, k: int, idx: np.ndarray):
        return arr[k] if arr.ndim == 1 else arr[idx, k]

    out = x.copy()
    for k in range(knots.shape[-1] - 1):
        idx = np.flatnonzero((x >= knots[..., k]) & (x < knots[..., k + 1]))
        if idx.size == 0:
            continue
        a0, a1 = col(knots, k, idx), col(knots, k + 1, idx)
        q0, q1 = col(values, k, idx), col(values, k + 1, idx)
        out[idx] = q0 + (q1 - q0) / np.maximum(a1 - a0, 1e-12) * (x[idx] - a0)
    return out


def contraction(phase: np.ndarray | float, systole: float) -> np.ndarray:
    """Contraction state ``c`` in [0, 1] over the cardiac cycle (0 at ED, 1 at ES).

    ``phase`` in cycles (ED at integer phases); ``systole`` is the ES phase (fraction of the cycle). Systole is a
    half-cosine; diastole has rapid filling (to 20 %), diastasis and the atrial kick, all C1-continuous.
    """
    p = np.mod(np.asarray(phase, dtype=np.float64), 1.0)
    fill_end = systole + 0.2 * (1.0 - systole) + 0.1
    kick_start = 1.0 - 0.16
    c_dias = 0.2
    out = np.where(
        p <= systole,
        0.5 * (1.0 - np.cos(np.pi * p / systole)),
        np.where(
            p <= fill_end,
            c_dias + (1.0 - c_dias) * 0.5 * (1.0 + np.cos(np.pi * (p - systole) / (fill_end - systole))),
            np.where(
                p <= kick_start,
                c_dias,
                c_dias * 0.5 * (1.0 + np.cos(np.pi * (p - kick_start) / (1.0 - kick_start))),
            ),
        ),
    )
    return out


def sample_patient_params(rng: np.random.Generator) -> dict:
    """Patient-level parameters shared by all views of a patient (sizes in mm, fractions, timing)."""
    u = rng.uniform
    return {
        "heart_rate": float(u(58.0, 85.0)),
        "systole": float(u(0.33, 0.40)),
        "age": int(rng.integers(25, 86)),
        "sex": str(rng.choice(["F", "M"])),
        "L": float(u(70.0, 85.0)),
        "R": float(u(19.5, 23.5)),
        "h": float(u(8.0, 10.5)),
        "h_apex_ratio": float(u(0.75, 0.95)),
        "c": float(u(0.58, 0.66)),
        "long_shortening": float(u(0.17, 0.24)),
        "endo_contraction": float(u(0.24, 0.32)),
        "wall_thickening": float(u(1.3, 1.5)),
        "cap_thickening": float(u(0.2, 0.4)),
        "la_expansion": float(u(0.08, 0.16)),
        "la_a": float(u(19.0, 24.0)),
        "la_q": float(u(0.55, 0.72)),
        "la_wall": 2.5,
        "pathology_side": int(rng.choice([-1, 1])),
        "pathology_level": str(rng.choice(["apical", "mid", "basal"])),
    }


def sample_view_params(rng: np.random.Generator, view: str, patient: dict) -> dict:
    """View-level parameters: in-plane widths, orientation, position in the sector and sector geometry."""
    u = rng.uniform
    out = {
        "view": view,
        "R_left": patient["R"] * float(u(0.9, 1.1)),
        "R_right": patient["R"] * float(u(0.9, 1.1)),
        "h_left": patient["h"] * float(u(0.9, 1.1)),
        "h_right": patient["h"] * float(u(0.9, 1.1)),
        "tilt_deg": float(u(-6.0, 6.0)),
        "apex_depth": float(u(28.0, 36.0)),
        "apex_x": float(u(-4.0, 4.0)) if view == "2CH" else float(u(5.0, 11.0)),
        "sector_deg": float(u(68.0, 78.0)),
        "depth": float(u(145.0, 160.0)),
    }
    # the LA roof (~1.7 LA half-lengths below the mitral plane) must stay inside the sector
    la_far = out["apex_depth"] + patient["L"] + (1.0 + patient["la_q"]) * patient["la_a"]
    out["depth"] = max(out["depth"], la_far + 8.0)
    if view == "4CH":
        out.update({"rv_width": float(u(20.0, 27.0)), "rv_wall": 4.0, "ra_a": float(u(16.0, 21.0)),
                    "ra_b": float(u(13.0, 17.0))})
    return out


@dataclass
class _State:
    """Scalar deformation state of one frame (fractions of the ES values scaled by the contraction ``c``)."""

    e: float  # longitudinal shortening of the LV part [0, L]
    k: float  # fractional inward motion of the endocardium
    th: float  # lateral wall thickening factor
    tau: float  # apical cap thickening (longitudinal stretch of [-h_a, 0])
    kap: float  # LA lateral expansion


class EchoAnatomy:
    """Reference shapes, exact motion ``Φ_t`` and its inverse for one simulated view.

    ``patient``/``view`` are the dicts of :func:`sample_patient_params` / :func:`sample_view_params`;
    ``pathology`` in [0, 1] reduces contraction and thickening in the patient's pathological segment (1 = akinetic).
    """

    def __init__(self, patient: dict, view: dict, pathology: float = 0.0):
        if not 0.0 <= pathology <= 1.0:
            raise ValueError(f"pathology must be in [0, 1], got {pathology}")
        self.p, self.v, self.pathology = patient, view, float(pathology)
        self.L = patient["L"]
        self.cL = patient["c"] * self.L
        self.h_a = patient["h"] * patient["h_apex_ratio"]
        psi = math.radians(view["tilt_deg"])
        self.u = np.array([math.sin(psi), math.cos(psi)])  # long axis, towards the base
        self.w = np.array([math.cos(psi), -math.sin(psi)])  # across the axis
        self.A = np.array([view["apex_x"], view["apex_depth"]])
        self.R = {-1: view["R_left"], 1: view["R_right"]}
        self.h = {-1: view["h_left"], 1: view["h_right"]}
        # LA: ellipse centred at l_c = L + q a whose chord at l = L meets both annulus points
        self.la_a = patient["la_a"]
        self.la_lc = self.L + patient["la_q"] * self.la_a
        chord = math.sqrt(1.0 - patient["la_q"] ** 2)
        self.la_b = {s: self.rho_endo(np.array([self.L]), s)[0] / chord for s in (-1, 1)}
        self.la_far = self.la_lc + self.la_a
        self.l_fixed_top = -self.h_a - 3.0
        self.l_fixed_bottom = self.la_far + 8.0
        lv_w = {s: self.R[s] + self.h[s] for s in (-1, 1)}
        self.r_hi = lv_w[1] + 6.0
        self.r_lo = -(lv_w[-1] + 6.0 + (view["rv_width"] + view["rv_wall"] if view["view"] == "4CH" else 0.0))
        lvl = patient["pathology_level"]
        bounds = {"apical": (0.0, 0.35), "mid": (0.35, 0.7), "basal": (0.7, 1.0)}[lvl]
        self.seg = (bounds[0] * self.L, bounds[1] * self.L)
        self.seg_side = 0 if lvl == "apical" else patient["pathology_side"]

    # ------------------------------------------------------------------ frames
    def to_lv(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = X - self.A[0], Y - self.A[1]
        return dx * self.u[0] + dy * self.u[1], dx * self.w[0] + dy * self.w[1]

    def from_lv(self, l: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.A[0] + l * self.u[0] + r * self.w[0], self.A[1] + l * self.u[1] + r * self.w[1]

    def state(self, c: float) -> _State:
        p = self.p
        return _State(e=p["long_shortening"] * c, k=p["endo_contraction"] * c,
                      th=1.0 + (p["wall_thickening"] - 1.0) * c, tau=p["cap_thickening"] * c,
                      kap=p["la_expansion"] * c)

    # ------------------------------------------------------------------ shapes (reference configuration)
    def rho_endo(self, l: np.ndarray, side: int | np.ndarray) -> np.ndarray:
        R = np.where(np.asarray(side) > 0, self.R[1], self.R[-1])
        z = (l - self.cL) / self.cL
        return np.where((l >= 0) & (l <= self.L), R * np.sqrt(np.clip(1.0 - z * z, 0.0, None)), 0.0)

    def rho_epi(self, l: np.ndarray, side: int | np.ndarray) -> np.ndarray:
        s = np.asarray(side) > 0
        W = np.where(s, self.R[1] + self.h[1], self.R[-1] + self.h[-1])
        z = (l - self.cL) / (self.cL + self.h_a)
        return np.where(l <= self.L, W * np.sqrt(np.clip(1.0 - z * z, 0.0, None)), 0.0)

    def rho_la(self, l: np.ndarray, side: int | np.ndarray) -> np.ndarray:
        b = np.where(np.asarray(side) > 0, self.la_b[1], self.la_b[-1])
        z = (l - self.la_lc) / self.la_a
        return np.where(l > self.L, b * np.sqrt(np.clip(1.0 - z * z, 0.0, None)), 0.0)

    def ref_labels(self, l: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Labels (0 bg, 1 LV, 2 Myo, 3 LA) of reference LV-frame points, any shape."""
        side = np.where(r >= 0, 1, -1)
        ar = np.abs(r)
        lab = np.zeros(l.shape, dtype=np.uint8)
        lab[(l <= self.L) & (ar <= self.rho_epi(l, side)) & (l >= -self.h_a)] = 2
        lab[(l >= 0) & (l <= self.L) & (ar <= self.rho_endo(l, side))] = 1
        lab[(l > self.L) & (ar <= self.rho_la(l, side))] = 3
        return lab

    # ------------------------------------------------------------------ motion
    def _segment_weight(self, l: np.ndarray, side: np.ndarray) -> np.ndarray:
        """Smooth indicator of the pathological segment along ``l`` on its side (both sides when apical)."""
        a, b = self.seg
        lo = _smoothstep((l - a + 3.0) / 6.0) if a > 0 else np.ones_like(l)
        hi = 1.0 - _smoothstep((l - b + 3.0) / 6.0) if b < self.L else np.ones_like(l)
        on_side = np.ones_like(l) if self.seg_side == 0 else (side == self.seg_side).astype(np.float64)
        return lo * hi * on_side

    def _lv_lateral_map(self, l: np.ndarray, side: np.ndarray, st: _State) -> tuple[np.ndarray, np.ndarray]:
        """Knots/values (N, 4) of the LV lateral map ``|r| -> |r'|`` at reference ``l`` (clamped to the base)."""
        zero = np.zeros_like(l)
        lv_l = np.minimum(l, self.L)
        rn, re = self.rho_endo(lv_l, side), self.rho_epi(lv_l, side)
        m = _smoothstep(lv_l / (0.35 * self.L))
        if self.pathology > 0:
            m = m * (1.0 - self.pathology * self._segment_weight(lv_l, side))
        q1 = rn * (1.0 - st.k * m)
        q2 = q1 + (re - rn) * (1.0 + (st.th - 1.0) * m)
        return np.stack([zero, rn, re, re + _LAMBDA], 1), np.stack([zero, q1, q2, re + _LAMBDA], 1)

    def _la_lateral_map(self, l: np.ndarray, side: np.ndarray, st: _State) -> tuple[np.ndarray, np.ndarray]:
        """Knots/values (N, 4) of the LA lateral map (the atrium widens by ``kap``, its wall keeps its thickness)."""
        zero = np.zeros_like(l)
        ra = self.rho_la(np.maximum(l, self.L + 1e-6), side)
        wall = self.p["la_wall"]
        a1 = ra * (1.0 + st.kap)
        return (np.stack([zero, ra, ra + wall, ra + wall + _LAMBDA], 1),
                np.stack([zero, a1, a1 + wall, ra + wall + _LAMBDA], 1))

    def _lateral(self, x: np.ndarray, l: np.ndarray, side: np.ndarray, st: _State, inverse: bool) -> np.ndarray:
        """Apply the lateral map (or its inverse) to ``x = |r|`` (N,) at reference ``l``.

        Above the mitral-plane band the LV map applies, below it the LA map, and inside the band their blend
        ``(1 - beta) f_LV + beta f_LA`` (monotone, piecewise linear on the union of both knot sets).
        """
        beta = _smoothstep((l - (self.L - _BLEND)) / (2.0 * _BLEND))
        out = np.empty_like(x)
        for sel, maker in ((beta <= 0.0, self._lv_lateral_map), (beta >= 1.0, self._la_lateral_map)):
            idx = np.flatnonzero(sel)
            if idx.size:
                kn, va = maker(l[idx], side[idx], st)
                out[idx] = _pl_eval(x[idx], va, kn) if inverse else _pl_eval(x[idx], kn, va)
        idx = np.flatnonzero((beta > 0.0) & (beta < 1.0))
        if idx.size:
            kv, qv = self._lv_lateral_map(l[idx], side[idx], st)
            ka, qa = self._la_lateral_map(l[idx], side[idx], st)
            b = beta[idx][:, None]
            knots = np.concatenate([kv, ka[:, 1:]], axis=1)
            nk = knots.shape[1]
            # both maps at every union knot, in one call each (rows repeated once per knot)
            fv = _pl_eval(knots.ravel(), np.repeat(kv, nk, 0), np.repeat(qv, nk, 0)).reshape(-1, nk)
            fa = _pl_eval(knots.ravel(), np.repeat(ka, nk, 0), np.repeat(qa, nk, 0)).reshape(-1, nk)
            vals = (1.0 - b) * fv + b * fa
            order = np.argsort(knots, axis=1, kind="stable")
            knots, vals = np.take_along_axis(knots, order, 1), np.take_along_axis(vals, order, 1)
            out[idx] = _pl_eval(x[idx], vals, knots) if inverse else _pl_eval(x[idx], knots, vals)
        return out

    def _long_amplitude(self, r1: np.ndarray) -> np.ndarray:
        """1 across the heart, ramping to 0 over ``_RAMP`` mm outside it (the chest and lungs do not shorten)."""
        below = 1.0 - _smoothstep((self.r_lo - r1) / _RAMP)
        above = 1.0 - _smoothstep((r1 - self.r_hi) / _RAMP)
        return below * above

    def _long_knots(self, r1: np.ndarray, st: _State) -> tuple[np.ndarray, np.ndarray]:
        """Knots (6,) and values (N, 6) of the longitudinal map ``l -> l'`` at deformed lateral position ``r1``."""
        amp = self._long_amplitude(r1)
        if self.seg_side == 0:
            wseg = np.ones_like(r1)
        else:  # the pathological wall, smoothly switched across the cavity centre
            wseg = 1.0 / (1.0 + np.exp(-self.seg_side * r1 / 3.0))
        red = 1.0 - self.pathology * wseg
        a, b = self.seg
        t0, t5 = self.l_fixed_top, self.l_fixed_bottom
        s_cap = 1.0 + st.tau * amp * (red if self.seg_side == 0 else 1.0)
        s_lv = 1.0 - st.e * amp
        s_seg = 1.0 - st.e * amp * red
        n = r1.size
        knots = np.array([t0, 0.0, a, b, self.L, t5])  # shared by every point
        v1 = t0 + s_cap * (0.0 - t0)
        v2 = v1 + s_lv * a
        v3 = v2 + s_seg * (b - a)
        v4 = v3 + s_lv * (self.L - b)
        vals = np.stack([np.full(n, t0), v1, v2, v3, v4, np.full(n, t5)], axis=1)
        return knots, vals

    def _moving(self, l: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Points of the box where ``Φ_t`` can differ from the identity; ``Φ_t`` maps the box onto itself."""
        return (l > self.l_fixed_top) & (l < self.l_fixed_bottom) & (r > self.r_lo - _RAMP) & (r < self.r_hi + _RAMP)

    def forward(self, l: np.ndarray, r: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        """``Φ_t``: reference LV-frame points (any shape) -> positions at contraction ``c``."""
        shape = l.shape
        l, r = l.ravel().astype(np.float64), r.ravel().astype(np.float64)
        out_l, out_r = l.copy(), r.copy()
        mv = self._moving(l, r)
        l, r = l[mv], r[mv]
        st = self.state(c)
        side = np.where(r >= 0, 1, -1)
        r1 = side * self._lateral(np.abs(r), l, side, st, inverse=False)
        kn, va = self._long_knots(r1, st)
        out_l[mv], out_r[mv] = _pl_eval(l, kn, va), r1
        return out_l.reshape(shape), out_r.reshape(shape)

    def inverse(self, l1: np.ndarray, r1: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        """``Φ_t^{-1}``: positions at contraction ``c`` -> reference LV-frame points (exact inverse of forward)."""
        shape = l1.shape
        l1, r1 = l1.ravel().astype(np.float64), r1.ravel().astype(np.float64)
        out_l, out_r = l1.copy(), r1.copy()
        mv = self._moving(l1, r1)
        l1, r1 = l1[mv], r1[mv]
        st = self.state(c)
        kn, va = self._long_knots(r1, st)
        l = _pl_eval(l1, va, kn)
        side = np.where(r1 >= 0, 1, -1)
        out_l[mv], out_r[mv] = l, side * self._lateral(np.abs(r1), l, side, st, inverse=True)
        return out_l.reshape(shape), out_r.reshape(shape)

    # ------------------------------------------------------------------ centre line
    def _centre_line_shape(self) -> tuple[float, dict[int, float], float]:
        """Semi-axes of the mid-wall ellipse (``a_l`` along the axis, ``b[side]`` across) and the parameter
        ``t_end`` of its basal ends: a side's line is ``l = cL - a_l cos(t), r = side b[side] sin(t)``, t in
        [0, t_end], t = 0 at the apex."""
        a_l = self.cL + 0.5 * self.h_a
        l_end = self.L - 2.0
        t_end = math.acos(np.clip((self.cL - l_end) / a_l, -1.0, 1.0))
        return a_l, {s: self.R[s] + 0.5 * self.h[s] for s in (-1, 1)}, t_end

    def centre_line(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` reference points (l, r) equally spaced by arc length on the myocardial mid-wall line.

        The line runs from the left base through the apex to the right base, on the ellipse halfway between
        endocardium and epicardium (so it lies inside the myocardium), stopping 2 mm short of the mitral plane.
        """
        a_l, b_side, t_end = self._centre_line_shape()
        ts = np.linspace(0.0, t_end, 600)
        pts = []
        for s in (-1, 1):
            b = b_side[s]
            ll = self.cL - a_l * np.cos(ts)
            rr = s * b * np.sin(ts)
            pts.append((ll, rr))
        l_all = np.concatenate([pts[0][0][::-1], pts[1][0][1:]])
        r_all = np.concatenate([pts[0][1][::-1], pts[1][1][1:]])
        seg = np.hypot(np.diff(l_all), np.diff(r_all))
        s_cum = np.concatenate([[0.0], np.cumsum(seg)])
        s_new = np.linspace(0.0, s_cum[-1], n)
        return np.interp(s_new, s_cum, l_all), np.interp(s_new, s_cum, r_all)

    def centre_line_length(self, c: float, panels: int = 32, order: int = 8) -> float:
        """Arc length (mm) of the continuous mid-wall centre line (the curve :meth:`centre_line` samples) deformed
        by ``Φ`` at contraction ``c``: the true myocardial length behind the simulator's GLS.

        The length is ``∫ |d/dt Φ_c(γ(t))| dt`` over each side's parameter ``t`` of the reference ellipse ``γ``
        (:meth:`_centre_line_shape`), by composite Gauss-Legendre quadrature (``panels`` panels of ``order`` nodes
        between consecutive breakpoints). It uses the motion model only, never a polyline through tracked points,
        so it is an independent reference for the GLS of tracks. Breakpoints are where the deformed curve has a
        kink: the longitudinal map is piecewise linear in ``l`` with knots at the endocardial apex (``l = 0``) and
        the pathological segment's ends, and the quadrature would converge slowly across a kink. The derivative is
        a central difference of ``Φ_c(γ(t))`` in ``t`` (step ``1e-6`` rad: truncation ~1e-12, rounding ~1e-9 of the
        speed), since ``Φ`` is known only as a map, not in closed form; Gauss nodes sit well inside their panels,
        so no difference straddles a breakpoint.
        """
        if panels < 1 or order < 1:
            raise ValueError(f"panels and order must be >= 1, got {panels}, {order}")
        a_l, b_side, t_end = self._centre_line_shape()
        breaks = {0.0, t_end}
        for l_knot in (0.0, *self.seg):
            cos_t = (self.cL - l_knot) / a_l
            if -1.0 < cos_t < 1.0 and 0.0 < math.acos(cos_t) < t_end:
                breaks.add(math.acos(cos_t))
        bp = np.array(sorted(breaks))
        edges = np.unique(np.concatenate([np.linspace(bp[i], bp[i + 1], panels + 1) for i in range(bp.size - 1)]))
        x, w = np.polynomial.legendre.leggauss(order)
        half = 0.5 * np.diff(edges)[:, None]
        t = ((0.5 * (edges[:-1] + edges[1:]))[:, None] + half * x).ravel()
        weights = (half * w).ravel()
        step = 1e-6
        total = 0.0
        for s in (-1, 1):
            lp, rp = self.forward(self.cL - a_l * np.cos(t + step), s * b_side[s] * np.sin(t + step), c)
            lm, rm = self.forward(self.cL - a_l * np.cos(t - step), s * b_side[s] * np.sin(t - step), c)
            total += float(np.sum(weights * np.hypot(lp - lm, rp - rm)) / (2.0 * step))
        return total
