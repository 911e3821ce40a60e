"""Sampling grids fitted to a model: the noise levels at which a sampler, on this model, lands
closest to the model's own exact ODE solution.

Align Your Steps (Sabour, Fidler & Kreis 2024) showed that a schedule optimised for one model beats
the hand-made ones at few steps. AYS minimises an upper bound on the KL divergence between the
discretised and the exact reverse SDE (its KLUB), estimated on data, by refining one level at a
time. :func:`fit_sigmas` keeps that plan (optimise the grid for the model at hand, from the model)
but minimises the error itself, as LD3 (Tong et al. 2025, "Learning to Discretize Denoising
Diffusion ODEs") does with a learned grid, and needs no data: only calls of the denoiser.

The objective. Draw M starting noises x_T^(j) ~ N(0, prior_std(sigma_max)^2 I) (the model's own
prior, ``seed``); solve the probability-flow ODE of the model from sigma_max to sigma_min with
Dormand-Prince 5(4) at ``rtol`` (:func:`difflab.samplers.adaptive.solve_ode`) and denoise there:
y^(j) = D(Phi(x_T^(j)), sigma_min), the answer every sampler of this model converges to. For a grid
s = (sigma_max, sigma_1, ..., sigma_{n-1}, 0) and the sampler S,

    J(s) = sqrt( sum_j ||S(x_T^(j); s) - y^(j)||^2 / (M * numel) ),

the RMSE per coordinate to the exact ODE, i.e. the quantity the grid is for.

The grids searched. Free levels (AYS's per-level refinement) overfit M trajectories: on the
closed-form family the fitted levels came in near-coincident pairs that a multistep solver exploits
on typical trajectories and that fail on others (error on new noise 5-50 times the fitted one).
So the levels come from four numbers, :func:`difflab.core.grids.density_sigmas`: where the first
step lands (sigma_1), the last level (sigma_{n-1}), and a step density in log sigma between them,
log-linear through three knots (the first fixed to 0). J is minimised over them in log space by
Nelder-Mead (Nelder & Mead 1965), started from the best of a 3 x 3 scan of (sigma_1, sigma_{n-1})
scaled by the spread of the model's own samples y.

Rare misses. On new noise the typical error stays close to the fitted one; what does not carry over
is the rare trajectory (0.1-0.5% of them on the family's worst members), next to the boundary
between two modes, that a coarse step sends to the wrong one: one such miss in 256 costs 5-10 times
the typical RMSE, and 256 fitting trajectories see none or one of them (then that one decides J).
So with ``pool`` = N > M (:func:`fit_sampler` uses N = 1024 from 10 steps on) J is estimated on a
stratified subset of N trajectories: the M / 4 worst under the best scanned grid all count (weight
1 / N each), the rest through the first M - M / 4 of the others (weight (N - M/4) / (N (M - M/4))),
an unbiased estimate of the MSE over all N for every grid that contains the pool's rare misses.

The rule (:func:`fit_sampler`). The grid fitted for UniPC-3 is then checked against candidates on
1024 further trajectories of the model that no fit saw: the fitted and the exponential grid, each
with UniPC-3 and UniPC-2, and the one with the lowest RMSE there is kept. Developed on the tuning
family (``random_family(20, seed=1)``, bench/few_step_solvers.py's diffusers' best as the yardstick,
first 15 members): at 10 steps the plain fit was 2.1 times diffusers' best on one member and the
stratified fit 0.97 at worst; at 5 steps the stratified fit (N = 2M only) was worse (1.37), hence
none there. Tried and dropped: starting the 10- and 20-step searches also from the fit at half the
steps (it never beat the scan's best start on the tuning family); lower-order final steps as a
candidate; the `optimized` grid as a candidate (chosen on 512 held-out trajectories for one tuning
member, it was 13 times diffusers' best on that member's test noise: it stops above the scale of
small components).

A wider check, tried and not kept. The misses left (a few of 256 test starts sent to the wrong
mode; one of them costs 5-10 times the typical RMSE) are mostly genuine solver errors, not starts
whose exact answer is ill-conditioned: on tuning member #1 of seed 1, of the six held-out
trajectories that some UniPC candidate sent to the wrong mode at 10 steps, one moved under a 0.1%
change of the start. But every candidate misses at some rate (0.1-0.7% at 10 steps on the worst
members, whatever the grid or order), and which has the fewest in the held-out set does not say
which has none in 256 test starts (on member #4 of seed 3 the candidates are 0.6-8.5 times
diffusers' best at 10 steps and 0.3-32 at 20, by how many of one to three hard starts each lands
right). The rule tried: twelve candidates, the fitted, the exponential, the midway (level by level
the geometric mean of those two) and the floored grid (the fitted one with its step density in log
sigma raised to at least 1/1.5 of the uniform one between its ends) each with UniPC-3, UniPC-2 and
UniPC-3 with lower-order final steps, chosen on 2048 held-out trajectories. On the tuning
families (14 members of seed 1, 11 of seed 3), this rule -> the 2 x 2 on 1024 above, at 5 / 10 /
20 steps: median ratio to diffusers' best 0.40 / 0.25 / 0.13 -> 0.41 / 0.24 / 0.09, worst 0.87 /
6.62 / 1.02 -> 0.95 / 6.62 / 25.4, members worse than diffusers' best 0 / 1 / 1 -> 0 / 2 / 1. On the
evaluation family (seed 2, run once): median 0.39 / 0.26 / 0.17, worst 0.82 / 5.03 / 9.29, members
worse 0 / 2 / 2 (against 0 / 2 / 1 for this rule: #17 at 20 steps went from 0.35 to 5.3 on one
ill-conditioned start), and at a higher cost (the whole bench took 793 CPU s against 512,
the diffusers half being the same; fits took a median 12 s, at most 273 s, wall on the loaded
machine). Over the 45 members both rules miss
the bar 6 times, so the cheaper one stays. Also tried: choosing by the miss count first (the RMSE
plus 10 or 100 times the miss rate times the spread squared: the worst member at 5 steps went to
1.19, nothing better at 10 or 20); DPM-Solver++(2M) and (3M) as candidates (more misses than UniPC
on the fitted grid: 10 against 3 in 3072 on a tuning member at 10 steps); a floor relative to the
exponential grid's step (it rarely bound, never for the better); the Karras grid (worse than the
exponential one on the tuning member it was run on). What would be needed is a solver with a miss
rate far below 1 in 1000 on such members, not a better choice among these.

The losses left are draws (stop 37). The evaluation family's three members above diffusers' best (#1
and #6 at 10 steps, #3 at 20) were re-scored on seven fresh sets of 256 starts each
(bench/few_step_resample.py), against the best of diffusers' configurations picked again on each
set: the rule is at or below it on 6, 5 and 6 of the 8 sets (the bench's own included), and over all
2048 starts its RMSE is 0.60, 0.57 and 0.63 times that of the configuration that won the bench's
set. That configuration sends 0 or 1 of the bench's 256 starts to the wrong component and 0-5 of
each fresh 256 (a rate of 0.5-1%, e.g. DEIS-3 on the exponential grid for #1, 16 of 2048); the rule
sends 0-3 (#1: 6 of 2048). On 2048 fresh starts the kept choice (fitted grid, UniPC-3 bh2) sent 6 to
the wrong component on #1 and 6 on #6; the other candidates (UniPC-3 / 2, DEIS-3, DPM-Solver++(3M),
each on the fitted and the exponential grid) 6-1168 on #1 and 8-28 on #6; on #1 UniPC-3 bh1 46,
UniPC-3 without corrector 10, the rule with a fit on a pool of 2048 17 and on 4096 3 (it kept
UniPC-2 there; 6 with UniPC-3), and weighting the pool's worst quarter 4 or 16 times left the
bench's miss on #1 in place. The misses thin out slowly with steps (#1, on the 2048 model
trajectories of the fit: 5 at 10 steps, 1 at 20 on a grid fitted for 20). The missed starts are not
ill-conditioned at the bench's 0.1% (of seven looked at, two moved under a 1% change of the start,
five not under 3%); they flip between components at sigma 0.2-2, the scale of the distance between
means, some back and forth over several steps. So a 256-start set with none of them is luck, for
either side, and the rule stays as it is.

On a second family, random_family(10, seed=3) (11 of its members were among the tuning members when
this rule was chosen over the twelve-candidate one), the bench gives a median 0.41 / 0.21 / 0.09 at
5 / 10 / 20 steps, worst 0.69 / 6.62 / 25.4, members worse 0 / 2 / 1. Re-scored on fresh sets
(bench/few_step_resample.py --seed 3): #4 at 20 steps is a draw like those above (7 of 8 sets at or
below diffusers' best, only the bench's own set above, on one start sent astray), #4 at 10 steps a
near coin (4 of 8 sets; over the 2048 starts 0.70 times the bench winner's RMSE, 10 misses against
17), but #3 at 10 steps (1.16) a genuine loss: 1 of 8 sets, median 1.06 over the sets, though 0.91
times the bench winner over the 2048 starts. There the rule keeps UniPC-3 on the exponential grid,
which sends 1-4 of each 256 astray where diffusers' DPM-Solver++(3M) on log-SNR-uniform steps sends
1-2. difflab's DPM-Solver++(3M) on the exponential grid matches that configuration on the bench's
set (6.54e-3 against 6.60e-3, the rule 7.68e-3) but not on the rule's 1024 held-out trajectories
(RMSE 1.64e-2 against 1.02e-2 for the kept choice), so as a fifth candidate it would not have been
kept: no rule change came of it.

Grids from the model's stiffness, tried and not kept (stop 39). The reference solve's accepted
Dormand-Prince steps h (log sigma; its step control is set by the batch's hardest trajectory) give
a step density 1/h that peaks where the mode decision is made (sigma 0.3-0.6 on #3 of seed 3).
Candidates: levels between the fitted grid's ends at equal quantiles of (1/h)^a (a = 1 equidistributes
the error of a solver of any order when the solution's derivatives scale as powers of one rate;
a = 0.5 and 2 as well), each with UniPC-3 and UniPC-2, added to the four above. On the 10 members of
seed 3 at 5 / 10 / 20 steps: median 0.41 / 0.33 / 0.13 (a = 0.5), 0.41 / 0.21 / 0.13 (a = 1), 0.41 /
0.21 / 0.09 (a = 2) against 0.41 / 0.21 / 0.09 for the rule, the worst (#4: 6.62, 25.4) and the
members above diffusers' best (0 / 2 / 1) unchanged; on members 0-4 of seed 1 the same or worse (a = 1:
one member at 1.65 at 20 steps, none for the rule). Alone (fitted ends, the better order on the held-out
set) they were a median 0.79 / 0.50 / 0.60 (a = 0.5) and 0.89 / 0.59 / 1.14 (a = 1) of diffusers' best
on seed 3, and they send more starts astray, not fewer (#3 at 10 steps: 30 of 256 with a = 1 and
UniPC-3, 2 on the fitted grid): the misses do not come from too few levels in the decision band. A larger held-out set for the choice (4096 instead of 1024) moved #3 of
seed 3 at 10 steps from 1.16 to 2.17 and left #4 as it was: on 4096 held-out starts the kept choice
(fitted grid, UniPC-3) has the fewest misses of the four (#4: 9 at 10 steps, 1 at 20, against 25-64
and 2-12), and the bench's 256 hold 2 and 1 of them. The misses fall with the solver's order (#4 of
seed 3, fitted grid, 4096 held-out starts: UniPC-1 / 2 / 3 send 89 / 25 / 10 astray at 10 steps, 23 /
2 / 1 at 20; the exponential grid 178 / 64 / 30 and 56 / 12 / 4): they are the step's truncation error,
not an instability of the multistep extrapolation, so a lower order near the decision would not help;
a solver of order 4 or more might. The rule stays as it is. A never-used family, random_family(20,
seed=4), run once with it: a median 0.47 / 0.37 / 0.16 of diffusers' best at 5 / 10 / 20 steps, worst
0.89 / 3.89 (#19) / 8.99 (#5), members above diffusers' best 0 / 2 / 3 (#6 at 1.03 and #19 at 10; #4
1.39, #5 and #6 1.26 at 20); 686 CPU s for the whole bench. With the a = 1 stiffness grids as
candidates (run second, on diffusers' cached half): 0.47 / 0.37 / 0.18, the same worst, members above 0
/ 2 / 3 (#6 at 20 steps 1.01).

Order 4 (stop 39; sample_unipc accepts it now) does not remove the misses. On 4096 held-out starts,
grid fitted for UniPC-3, UniPC-4 / UniPC-3 send astray: #4 of seed 3 65 / 10 at 10 steps and 2 / 1
at 20 (exponential grid 288 / 30, 7 / 4); #3 of seed 3 11 / 9 and 1 / 1 (exponential 297 / 38, 0 / 0).
On #4 a grid fitted for UniPC-4 gives 19 and 2, UniP-4 alone 91 and 21, UniPC-4 bh1 85 and 6, and
UniPC-4 with lower-order final steps 8 and 2; the last also on seed 4: #19 3 against UniPC-3's 35
at 10 steps (RMSE 9.2e-3 against 1.3e-2), #6 21 / 30 at 10 and 15 / 19 at 20. As a fifth
held-out candidate on the fitted grid it was kept on 12 of the 60 seed-4 cases, but the bench gave
the same median 0.46 / 0.36 / 0.16, members above diffusers' best still 0 / 2 / 3 (#19 at 10 steps
3.89 to 2.54, #6 1.03 to 1.07, #4 at 20 1.39 to 1.44; 319 CPU s): not kept.

Cost: the reference (one adaptive solve, about 100-400 evaluations, for N + 1024 trajectories), at
most ``max_evals`` runs of the sampler (``steps`` evaluations of M samples each), one run on the
pool and four on the held-out set. For the closed-form models of ``bench/few_step_solvers.py``
(d <= 64, up to 32 components) see BENCHMARKS.md ("Few-step solvers on a family of models").
"""
from __future__ import annotations

import math

import torch

from ..core.grids import check_sigmas, density_sigmas, exponential_sigmas
from .adaptive import solve_ode
from .unipc import sample_unipc

# The recommended few-step rule (docs/samplers.md): UniPC-3, bh2, no lower-order final steps, on a
# grid fitted for it. Chosen on the tuning family (random_family seed 1): with a fitted grid the
# final steps need no lowering (median 0.36x vs 0.59x of diffusers' best at 5 NFE on its first 12
# models with the first version of the fit; 0.44x vs 0.45x on all 24 with this one), and bh2 beat
# bh1 at 10 and 20 NFE (0.22x vs 0.47x at 10).
SAMPLER_KWARGS = {"order": 3, "variant": "bh2", "lower_order_final": False}


def default_samples(steps: int) -> int:
    """M, the number of model trajectories to fit on: 2560 / steps within [256, 512] (512 at 5 steps,
    256 from 10 on). The fewer the steps, the more often a trajectory near the boundary between two
    modes is sent to the wrong one, and the RMSE counts those: fitting on more of them makes such
    misses rarer on new noise (the plain RMSE, not a robust one, for the same reason: on the tuning
    family a trimmed or L1 objective ignored them and the worst member at 5 steps went from 1.0 to
    3.2 times diffusers' best), and each run is cheaper at few steps."""
    return int(min(512, max(256, 2560 // max(steps, 1))))


def model_reference(denoiser, shape, samples: int, *, seed: int = 0, rtol: float = 1e-7, frame=None,
                    extra_args: dict | None = None, dtype=torch.float64, device=None):
    """``(x_T, y)``: ``samples`` starting noises of shape ``(samples, *shape)`` at the model's
    sigma_max (``seed``) and y = D(ODE solution at sigma_min, sigma_min), the model's own exact
    answer for each (Dormand-Prince 5(4) at ``rtol``; see the module docstring)."""
    frame = _frame(denoiser, frame)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=g, dtype=torch.float64)
    x = (x * float(frame.prior_std(torch.tensor(frame.sigma_max, dtype=torch.float64)))).to(device=device, dtype=dtype)
    extra_args = {} if extra_args is None else extra_args
    x_end, _ = solve_ode(denoiser, x, frame.sigma_max, frame.sigma_min, rtol=rtol, atol=rtol, max_nfe=10**6,
                         extra_args=extra_args)
    return x, denoiser(x_end, x.new_full((samples,), frame.sigma_min), **extra_args)


def fit_sigmas(denoiser, steps: int, shape, *, sampler=sample_unipc, sampler_kwargs: dict | None = None,
               samples: int | None = None, seed: int = 0, rtol: float = 1e-7, max_evals: int = 150, reference=None,
               frame=None, extra_args: dict | None = None, dtype=torch.float64, device=None,
               pool: int | None = None, return_info: bool = False):
    """A grid of ``steps`` levels then 0 for ``sampler`` on this model, fitted from the model alone:
    the :func:`difflab.core.grids.density_sigmas` grid that minimises the sampler's RMSE to the
    model's exact ODE solution on ``samples`` trajectories of its own (module docstring).

    ``sampler`` is a sampler function (default UniPC with :data:`SAMPLER_KWARGS`); the grid is fitted
    for it and its ``sampler_kwargs``, so use the same ones to sample. ``shape`` is one sample's
    shape (C, H, W), without the batch. ``reference`` = ``(x_T, y)`` from :func:`model_reference`
    reuses one reference for several step counts (its first ``samples`` rows are used, or with
    ``pool`` a stratified subset of ``samples`` of its first ``pool`` rows, see the module docstring). ``frame``
    gives sigma_min, sigma_max and the prior for denoisers without one (guidance wrappers);
    ``extra_args`` is the conditioning, as for samplers. The result is deterministic given ``seed``.

    Returns the grid (float64, decreasing, ending in 0), or ``(grid, info)`` with ``return_info``:
    ``info`` holds ``rmse`` (J at the fitted grid), ``rmse_start`` (at the best scanned start),
    ``evals`` (sampler runs), ``params`` (sigma_first, sigma_last, log_density) and ``samples``.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    frame = _frame(denoiser, frame)
    samples = default_samples(steps) if samples is None else int(samples)
    kwargs = dict(SAMPLER_KWARGS if sampler is sample_unipc and sampler_kwargs is None else sampler_kwargs or {})
    if reference is None:
        reference = model_reference(denoiser, shape, max(samples, pool or 0), seed=seed, rtol=rtol, frame=frame,
                                    extra_args=extra_args, dtype=dtype, device=device)
    pool = samples if pool is None else int(pool)
    if pool < samples or len(reference[0]) < pool:
        raise ValueError(f"pool={pool} must be at least samples={samples} and at most the reference's "
                         f"{len(reference[0])} trajectories")
    x, y = reference[0][:samples], reference[1][:samples].to(torch.float64)
    weights = torch.full((samples,), 1.0 / samples, dtype=torch.float64)
    lo, hi = math.log(frame.sigma_min), math.log(frame.sigma_max)
    evals = [0]

    def grid(theta):
        a = min(max(theta[0], lo + 0.01), hi - 0.01)
        b = min(max(theta[1], lo), a - 0.01) if len(theta) > 1 else a
        density = (0.0, *(min(max(c, -6.0), 6.0) for c in theta[2:]))  # density ratios up to e^12
        return density_sigmas(steps, frame.sigma_max, math.exp(a), math.exp(b), density)

    def errors(theta, x, y):
        out = sampler(denoiser, x, grid(theta), extra_args=extra_args, **kwargs)
        return (out.to(torch.float64) - y).pow(2).flatten(1).mean(1)

    def loss(theta) -> float:
        evals[0] += 1
        mse = (weights * errors(theta, x, y)).sum().item()
        return math.log(mse) / 2 if mse > 0 and math.isfinite(mse) else (math.inf if mse != 0 else -math.inf)

    if steps == 1:
        theta = (hi,)
        best = start = loss(theta)
    else:
        spread = (y - y.mean(0)).pow(2).mean().sqrt().item()
        theta, start = _scan(loss, spread, lo, hi, steps)
        if pool > samples:
            # Stratify the pool by the start's error: its `samples // 4` worst trajectories all count (weight
            # 1 / pool each), the others through `samples - hard` of them (weight (pool - hard) / (pool * n)):
            # an unbiased estimate of the pool's MSE for every grid, that sees its rare misses.
            pool_x, pool_y = reference[0][:pool], reference[1][:pool].to(torch.float64)
            e = errors(theta, pool_x, pool_y)
            evals[0] += 1
            hard = min(samples // 4, pool - samples)
            order = torch.argsort(e, descending=True, stable=True)
            rest = torch.sort(order[hard:]).values[:samples - hard]
            idx = torch.cat([order[:hard], rest])
            x, y = pool_x[idx], pool_y[idx]
            weights = torch.cat([torch.full((hard,), 1.0 / pool, dtype=torch.float64),
                                 torch.full((samples - hard,), (pool - hard) / (pool * (samples - hard)), dtype=torch.float64)])
            start = loss(theta)
        theta, best = _nelder_mead(loss, theta, start, [0.7, 0.7, 1.0, 1.0][:len(theta)], max_evals - evals[0])
    sigmas = check_sigmas(grid(theta))
    if not return_info:
        return sigmas
    params = dict(sigma_first=float(sigmas[1]), sigma_last=float(sigmas[-2]),
                  log_density=(0.0, *[float(t) for t in theta[2:]]))
    return sigmas, dict(rmse=math.exp(best), rmse_start=math.exp(start), evals=evals[0], params=params, samples=samples)


# The samplers the rule chooses among (each on the fitted grid and on the exponential grid), by their
# error on held-out trajectories of the model (fit_sampler).
CANDIDATE_KWARGS = (SAMPLER_KWARGS, {"order": 2, "variant": "bh2", "lower_order_final": False})


def default_pool(steps: int) -> int:
    """N, the model trajectories :func:`fit_sigmas` stratifies when :func:`fit_sampler` calls it: 1024
    where that is at least 4 times :func:`default_samples` (10 steps on), else none (N = M). At 5
    steps (M = 512 of 1024) the stratified fit was worse on 2 of the first 10 tuning members (up to
    1.37 times diffusers' best, against 0.95 without)."""
    samples = default_samples(steps)
    return 1024 if 1024 >= 4 * samples else samples


def default_holdout(steps: int) -> int:
    """V, the held-out model trajectories :func:`fit_sampler` chooses on: 1024 (a miss rate of 1 in
    200 shows as 5 misses)."""
    return 1024


def fit_sampler(denoiser, steps: int, shape, *, samples: int | None = None, pool: int | None = None,
                holdout: int | None = None, seed: int = 0, rtol: float = 1e-7, max_evals: int = 150, reference=None,
                frame=None, extra_args: dict | None = None, dtype=torch.float64, device=None, return_info: bool = False):
    """difflab's recommended few-step rule for this model: ``(sigmas, sampler_kwargs)``, to sample with
    ``sample_unipc(denoiser, x, sigmas, **sampler_kwargs)``; fitted from the model alone.

    1. Fit: :func:`fit_sigmas` for UniPC-3 (:data:`SAMPLER_KWARGS`) on ``samples`` of the first
       ``pool`` model trajectories (stratified by error, see fit_sigmas; defaults
       :func:`default_samples`, :func:`default_pool`).
    2. Check: on the next ``holdout`` trajectories of the model (never fitted on), score four
       candidates, the fitted grid and the exponential grid (uniform in log sigma, sigma_max to
       sigma_min) each with UniPC-3 and UniPC-2 (:data:`CANDIDATE_KWARGS`), by the RMSE to the
       model's exact answer, and keep the best.

    ``reference`` = ``(x_T, y)`` from :func:`model_reference` with at least ``pool + holdout`` rows
    (reused across step counts). Returns ``(sigmas, kwargs)`` or, with ``return_info``,
    ``(sigmas, kwargs, info)``: ``info`` has ``fit`` (fit_sigmas' info), ``scores`` (candidate
    (grid, order), held-out RMSE) and ``choice`` (the candidate kept)."""
    frame = _frame(denoiser, frame)
    samples = default_samples(steps) if samples is None else int(samples)
    pool = max(samples, default_pool(steps)) if pool is None else int(pool)
    holdout = default_holdout(steps) if holdout is None else int(holdout)
    if samples < 1 or holdout < 1 or pool < samples:
        raise ValueError(f"need 1 <= samples <= pool and holdout >= 1, got samples={samples}, pool={pool}, "
                         f"holdout={holdout}")
    if reference is None:
        reference = model_reference(denoiser, shape, pool + holdout, seed=seed, rtol=rtol, frame=frame,
                                    extra_args=extra_args, dtype=dtype, device=device)
    if len(reference[0]) < pool + holdout:
        raise ValueError(f"reference has {len(reference[0])} trajectories; fit_sampler needs pool + holdout = "
                         f"{pool + holdout}")
    fitted, info = fit_sigmas(denoiser, steps, shape, samples=samples, pool=pool, max_evals=max_evals,
                              reference=(reference[0][:pool], reference[1][:pool]), frame=frame, extra_args=extra_args,
                              return_info=True)
    x, y = reference[0][pool:pool + holdout], reference[1][pool:pool + holdout].to(torch.float64)
    exponential = fitted if steps == 1 else exponential_sigmas(steps, frame.sigma_min, frame.sigma_max)
    scores = []
    for grid_name, sigmas in (("fitted", fitted), ("exponential", exponential)):
        for kwargs in CANDIDATE_KWARGS:
            out = sample_unipc(denoiser, x, sigmas, extra_args=extra_args, **kwargs)
            rmse = (out.to(torch.float64) - y).pow(2).mean().sqrt().item()
            scores.append(((grid_name, kwargs["order"]), rmse if math.isfinite(rmse) else math.inf, sigmas, kwargs))
    name, _, sigmas, kwargs = min(scores, key=lambda t: t[1])
    if not return_info:
        return sigmas, dict(kwargs)
    return sigmas, dict(kwargs), dict(fit=info, scores=[(n, r) for n, r, *_ in scores], choice=name)


def _frame(denoiser, frame):
    frame = getattr(denoiser, "frame", None) if frame is None else frame
    if frame is None or not hasattr(frame, "sigma_max"):
        raise ValueError("fit_sigmas needs the model's frame (sigma_min, sigma_max, prior_std): pass frame= for a "
                         "denoiser that has none, e.g. a guidance wrapper (frame=denoiser.denoiser.frame)")
    return frame


def _scan(loss, spread: float, lo: float, hi: float, steps: int):
    """The best of 3 x 3 starts: the first level at 1, 3 or 10 times the spread of the model's own
    samples, the last at sigma_min, or a third or two thirds of the way in log sigma from sigma_min
    to the spread (density uniform in log sigma)."""
    s = math.log(max(spread, 1e-12))
    firsts = [min(max(s + math.log(k), lo + 0.1), hi - 0.1) for k in (1.0, 3.0, 10.0)]
    lasts = [lo + f * max(s - lo, 0.0) for f in (0.0, 1 / 3, 2 / 3)]
    best = (math.inf, None)
    for a in firsts:
        for b in (lasts if steps > 2 else lasts[:1]):
            # parameters: sigma_first; + sigma_last (2+ levels); + 1 or 2 log-density knots (3, 4+ levels)
            theta = ((a,) if steps == 2 else (a, min(b, a - 0.1)) + (0.0,) * min(steps - 3, 2))
            value = loss(theta)
            if value < best[0]:
                best = (value, theta)
    return best[1], best[0]


def _nelder_mead(f, x0, f0: float, step, max_evals: int, xtol: float = 0.01, ftol: float = 1e-4):
    """Minimise f from x0 (f(x0) = f0) by the Nelder-Mead simplex method (Nelder & Mead 1965;
    reflection 1, expansion 2, contraction 1/2, shrink 1/2), within ``max_evals`` evaluations."""
    n = len(x0)
    simplex = [list(x0)] + [[v + (step[i] if i == k else 0.0) for i, v in enumerate(x0)] for k in range(n)]
    values = [f0] + [f(p) for p in simplex[1:]]
    evals = n
    while evals < max_evals:
        order = sorted(range(n + 1), key=lambda i: values[i])
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        size = max(abs(p[i] - simplex[0][i]) for p in simplex[1:] for i in range(n))
        if size < xtol or values[-1] - values[0] < ftol:
            break
        centroid = [sum(p[i] for p in simplex[:-1]) / n for i in range(n)]
        point = lambda t: [c + t * (w - c) for c, w in zip(centroid, simplex[-1])]  # noqa: E731
        xr = point(-1.0)
        fr = f(xr)
        evals += 1
        if fr < values[0]:
            xe = point(-2.0)
            fe = f(xe)
            evals += 1
            simplex[-1], values[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = xr, fr
        else:
            xc = point(-0.5) if fr < values[-1] else point(0.5)
            fc = f(xc)
            evals += 1
            if fc < min(fr, values[-1]):
                simplex[-1], values[-1] = xc, fc
            else:  # shrink towards the best point
                for k in range(1, n + 1):
                    simplex[k] = [b + 0.5 * (v - b) for b, v in zip(simplex[0], simplex[k])]
                    values[k] = f(simplex[k])
                evals += n
    k = min(range(n + 1), key=lambda i: values[i])
    return tuple(simplex[k]), values[k]
