r"""Free-support Wasserstein barycenters of point clouds, on OTT-JAX.

WMDD's barycenter stage (docs/method.md, "Barycenter"): for one class with feature cloud
:math:`\nu = \sum_i a_i \delta_{x_i}` (``points [n, d]``, ``point_weights [n]``), find ``m`` support
points :math:`b_1 \dots b_m` and weights :math:`w \in \Delta_m` minimising

.. math::  W_2^2\big(\nu, \textstyle\sum_j w_j \delta_{b_j}\big)
           = \min_{P \in U(a, w)} \sum_{ij} P_{ij} \lVert x_i - b_j \rVert^2 .

Two variants, one switch (``learn_weights``):

* **uniform weights** (:math:`w_j = 1/m`, what the official WMDD release runs): the fixed point of
  Cuturi & Doucet (2014), :math:`b_j \leftarrow \sum_i P_{ij} x_i / \sum_i P_{ij}` (the barycentric
  projection of the plan), with :math:`P` an entropic plan from OTT's
  :class:`~ott.solvers.linear.sinkhorn.Sinkhorn` on the :class:`~ott.geometry.pointcloud.PointCloud`
  cost. Unlike POT (exact OT from scratch at every step) or OTT's ``FreeWassersteinBarycenter``
  (Sinkhorn from scratch at one epsilon), :math:`\varepsilon` is annealed geometrically from large to
  small over the outer steps (a deterministic-annealing path, which escapes the poor local optima
  where exact OT stalls) and every Sinkhorn solve is warm-started from the previous step's dual
  potentials and over-relaxed, so it needs far fewer iterations.
* **learned weights** (the paper's description): for fixed support the optimal weights send every
  point to its nearest support point, so the joint problem is exactly weighted k-means:
  :math:`w_j` = mass of the points nearest :math:`b_j`, :math:`b_j` = their weighted mean,
  :math:`W_2^2` = the weighted inertia. A jittable Lloyd loop, weighted k-means++ seeding, ``n_init``
  restarts. (OTT's ``k_means`` seeds without the point weights, so it would seed on zero-weight
  padding, and its loops fail the ``shard_map`` type check; hence our own.)

Everything is a pure function of arrays, for ``jax.jit``, ``jax.vmap`` (a batch of classes),
``jax.pmap`` and ``jax.shard_map`` with its default ``check_vma=True`` (see :class:`_Sinkhorn`).
Hyperparameters are Python numbers (static under ``jit``). Points are centred and scaled to unit
total variance inside and the result mapped back, so every :math:`\varepsilon` here is relative to
the cloud's variance :math:`\sum_i a_i \lVert x_i - \bar x\rVert^2`: clouds at scale 1e-3 or 1e3
behave the same. float32 by default (also for float16/bfloat16 inputs, whose squared distances
overflow), float64 for float64 inputs (with x64 enabled). Every op that multiplies matrices takes
``precision`` (default ``"highest"``), the precision of all the matmuls it traces, OTT's included:
JAX's default is one bfloat16 pass on TPU, far too coarse for these distances and epsilons.

Uniform weights, two starts: the annealed path can split the support badly between
well-separated clusters when ``m`` is no multiple of their number (4.6% above POT's exact fixed
point from the same data-point start in the tests), so a second, barely annealed run from the same
start (the entropic twin of that exact fixed point) runs too and the lower feasible-plan cost wins
(``second_start``; about twice the time).

Classes with fewer distinct locations than ``num_support`` (fewer real points, or duplicate rows:
identical images, saturated ReLUs): no error (batched and unbatched calls must agree, and a padded
batch cannot raise per class). The rule: the seeding puts a support point on every distinct
location, then hands out the remaining ones as copies *per location*: location ``l`` of mass
``A_l`` (the summed weight of all its rows) gets the next copy if it maximises
``A_l / (copies_l + 1)``, so copies follow the location masses, not the number of duplicate rows.
The uniform variant keeps mass ``1/m`` on each; coincident support points are first moved apart
by a tiny deterministic step (``split_delta``), since identical support points have identical
plan rows and would otherwise never separate: the fixed point can then put a copy between
locations where the mass requires it (2 locations of mass 1/2 at ``m = 5``: 2 + 2 on them and one
at the midpoint, the optimum). The learned-weights variant splits each location's mass equally
among its copies. With ``m`` a multiple of the location count and equal location masses both give
cost 0.

Input checks: shapes (``points [n, d]``, ``point_weights [n]``, ``init [m, d]``, labels ``[N]``)
and ``num_support`` (a positive int) raise ``ValueError`` always, values (finite, non-negative
weights with a positive sum, finite points of positive weight, labels in ``[0, C)``) in eager calls;
under ``jit`` an invalid class returns NaN and ``converged=False``. Zero-weight rows are padding and
may hold anything (NaN, 1e30). float16 and bfloat16 are computed and returned in float32.

Modules: ``api`` (the public functions and :class:`BarycenterOutput`), ``uniform`` (the annealed
Sinkhorn fixed point), ``kmeans`` (learned weights), ``seeding`` (k-means++ and the duplicate rule),
``cloud`` (checks, normalisation), ``distance`` (:func:`wasserstein2`), ``ott_compat`` (OTT's
Sinkhorn made ``shard_map``-safe), ``precision`` (the ``precision`` argument, checked and applied).
"""

from wmdd_jax.barycenter.api import (BarycenterOutput, class_barycenters, free_support_barycenter,
                                     kmeans_plus_plus, pad_classes)
from wmdd_jax.barycenter.distance import wasserstein2

__all__ = [
    "BarycenterOutput",
    "free_support_barycenter",
    "class_barycenters",
    "kmeans_plus_plus",
    "pad_classes",
    "wasserstein2",
]
