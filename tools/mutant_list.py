"""The curated mutants run by ``tools/mutants.py``: single-point edits a careless developer could make.

Each names the file, the exact snippet (it must occur once), its replacement, why it is a
plausible mistake, and the test files that mirror the module (run first, for speed; the whole
suite runs when they miss it). ``equivalent`` explains why a mutant cannot be told apart from the
original by any behaviour; such mutants are listed but not run or counted. Keep this list current:
a new code path gets the mutants a careless edit would make there.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MUTANTS", "Mutant"]


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    find: str
    replace: str
    why: str
    tests: tuple[str, ...] = ("tests",)
    equivalent: str = ""


GC = "tests/gradcheck"
LM = "tests/lazymaml"
CONTRACT = "tests/test_contract.py"

MUTANTS = [
    # benchmarks/common.py (shared by the meta-training benchmarks)
    Mutant(
        "benchmarks-interval-degrees-of-freedom",
        "benchmarks/common.py",
        "T_975.get(len(values) - 1, 1.96)",
        "T_975.get(len(values), 1.96)",
        "n instead of n − 1 degrees of freedom: intervals too narrow",
        ("tests/test_benchmarks.py",),
    ),
    Mutant(
        "benchmarks-pool-map-submission-order",
        "benchmarks/common.py",
        "return [futures[i].result() for i in range(len(jobs))]",
        "return [f.result() for f in futures.values()]",
        "results in the costliest-first submission order: rows attached to the wrong jobs",
        ("tests/test_benchmarks.py",),
    ),
    Mutant(
        "benchmarks-equal-time-from-diverged-runs",
        "benchmarks/sinusoid.py",
        'if not any(r["diverged"] for r in rs)] or list(mine.values())',
        'if not any(r["diverged"] for r in rs)] or list(mine.values())\n    finished = list(mine.values())',
        "a diverged run's early stop taken as the equal-time budget",
        ("tests/test_benchmarks.py",),
    ),
    Mutant(
        "benchmarks-methods-exact-match",
        "benchmarks/common.py",
        "args.keys = [k for k in methods if any(fnmatch.fnmatchcase(k, p) for p in args.methods)]",
        "args.keys = [k for k in methods if k in args.methods]",
        "--methods globs treated as exact keys",
        ("tests/test_benchmarks.py",),
    ),
    # gradcheck/task.py
    Mutant(
        "task-support-reads-query",
        "gradcheck/task.py",
        "        x, y = self.support\n        return self.loss(f(x), y)",
        "        x, y = self.query\n        return self.loss(f(x), y)",
        "copy-paste between support_loss and query_loss",
        (f"{GC}/test_oracle.py",),
    ),
    Mutant(
        "task-stack-concatenates",
        "gradcheck/task.py",
        "(torch.stack(parts) for parts in",
        "(torch.cat(parts) for parts in",
        "cat instead of stack: tasks merged into one",
        (f"{LM}/test_estimators.py",),
    ),
    Mutant(
        "as-tasks-first-only",
        "gradcheck/task.py",
        'not a task")\n    return tasks',
        'not a task")\n    return tasks[:1]',
        "a meta-batch silently reduced to its first task",
        (f"{LM}/test_estimators.py",),
    ),
    # gradcheck/settings.py
    Mutant(
        "settings-leap-zero-allowed",
        "gradcheck/settings.py",
        "if not 0 < self.leap <= 1:",
        "if not 0 <= self.leap <= 1:",
        "off-by-one interval: γ = 0 (no teacher at all) accepted",
        (CONTRACT,),
    ),
    Mutant(
        "settings-negative-steps",
        "gradcheck/settings.py",
        "        if steps < 0:",
        "        if steps < -1:",
        "K = −1 accepted",
        (CONTRACT,),
    ),
    Mutant(
        "settings-zero-inner-lr",
        "gradcheck/settings.py",
        "if self.inner_lr <= 0:",
        "if self.inner_lr < 0:",
        "α = 0 accepted",
        (CONTRACT,),
    ),
    # gradcheck/parameters.py
    Mutant(
        "adapt-prefix-startswith",
        "gradcheck/parameters.py",
        'return name == key or name.startswith(key + ".")',
        "return name.startswith(key)",
        "prefix matched as a string: '1' selects '10.weight', 'head' selects 'head_proj.weight'",
        (f"{GC}/test_parameters.py",),
    ),
    Mutant(
        "head-owner-startswith",
        "gradcheck/parameters.py",
        'return [n for n in names if n.rpartition(".")[0] == head]',
        "return [n for n in names if n.startswith(head)]",
        "the head preset's owner matched as a string prefix",
        (f"{GC}/test_parameters.py",),
    ),
    Mutant(
        "head-first-owner",
        "gradcheck/parameters.py",
        "head = owners[-1]",
        "head = owners[0]",
        "ANIL's head taken from the wrong end",
        (f"{GC}/test_parameters.py",),
    ),
    Mutant(
        "state-views-without-cast",
        "gradcheck/parameters.py",
        "return t.detach().to(dtype=cast, copy=True)",
        "return t.detach().to(dtype=cast)",
        "no copy when no cast is needed: in-place writes in forward reach the model",
        (f"{GC}/test_parameters.py",),
    ),
    Mutant(
        "dense-ones",
        "gradcheck/parameters.py",
        "{n: torch.zeros_like(t) if g is None else g for",
        "{n: torch.ones_like(t) if g is None else g for",
        "unused parameters get a non-zero gradient",
        (f"{GC}/test_oracle.py",),
    ),
    Mutant(
        "task-mean-sums",
        "gradcheck/parameters.py",
        "torch.stack([g[n] for g in gradients]).mean(0)",
        "torch.stack([g[n] for g in gradients]).sum(0)",
        "the meta-batch summed instead of averaged",
        (f"{LM}/test_estimators.py",),
    ),
    # gradcheck/student.py
    Mutant(
        "leap-from-the-wrong-end",
        "gradcheck/student.py",
        "return {n: t + leap * (phi[n] - t) for n, t in theta.items()}",
        "return {n: phi[n] + leap * (t - phi[n]) for n, t in theta.items()}",
        "γ measured from φ_K instead of θ",
        (f"{LM}/test_lazy.py",),
    ),
    Mutant(
        "leap-ignored",
        "gradcheck/student.py",
        "    if leap == 1:\n        return {n: phi[n] for n in theta}",
        "    if leap > 0:\n        return {n: phi[n] for n in theta}",
        "the teacher is always the student",
        (f"{LM}/test_lazy.py",),
    ),
    Mutant(
        "loss-check-nan-only",
        "gradcheck/student.py",
        "if not torch.isfinite(loss):",
        "if torch.isnan(loss):",
        "inf losses pass the check",
        (CONTRACT,),
    ),
    Mutant(
        "loss-name-zero-based",
        "gradcheck/student.py",
        "at inner step {k + 1} of {steps}",
        "at inner step {k} of {steps}",
        "error messages name the wrong inner step",
        (CONTRACT,),
    ),
    Mutant(
        "proximal-pull-sign",
        "gradcheck/student.py",
        "pull = proximal * (leaf.detach() - anchor)",
        "pull = proximal * (anchor - leaf.detach())",
        "iMAML's proximal term pushes away from θ",
        (f"{LM}/test_estimators.py",),
    ),
    Mutant(
        "fresh-shares-tensors",
        "gradcheck/student.py",
        "return {n: t.clone() for n, t in self.untrained.items()}",
        "return dict(self.untrained)",
        "runs share BatchNorm statistics: one run's in-place writes leak into the next",
        (f"{GC}/test_finite_differences.py", CONTRACT),
    ),
    # gradcheck/oracle.py and gradcheck/_higher.py
    Mutant(
        "oracle-copy-initial-weights",
        "gradcheck/oracle.py",
        "copy_initial_weights=False, track_higher_grads=True",
        "copy_initial_weights=True, track_higher_grads=True",
        "higher's default: θ detached, every term through θ dropped",
        (f"{GC}/test_oracle.py",),
    ),
    Mutant(
        "oracle-first-order-ignored",
        "gradcheck/oracle.py",
        "grad_callback=_constant if first_order else None",
        "grad_callback=None",
        "first_order=True silently second order",
        (f"{GC}/test_oracle.py",),
    ),
    Mutant(
        "oracle-leap-ignored",
        "gradcheck/oracle.py",
        "    if loop.leap != 1:",
        "    if loop.leap > 1:",
        "the oracle scores φ_K whatever γ is",
        (f"{GC}/test_oracle.py",),
    ),
    Mutant(
        "adam-no-bias-correction",
        "gradcheck/_higher.py",
        'denom = _sqrt(v) / math.sqrt(1 - beta2**step) + group["eps"]',
        'denom = _sqrt(v) + group["eps"]',
        "the second-moment bias correction forgotten",
        (f"{GC}/test_higher_defects.py",),
    ),
    Mutant(
        "adam-eps-before-correction",
        "gradcheck/_higher.py",
        'denom = _sqrt(v) / math.sqrt(1 - beta2**step) + group["eps"]',
        'denom = (_sqrt(v) + group["eps"]) / math.sqrt(1 - beta2**step)',
        "higher 0.2.1's own defect: ε added before the bias correction",
        (f"{GC}/test_higher_defects.py",),
    ),
    # gradcheck/memory.py
    Mutant(
        "meter-never-releases",
        "gradcheck/memory.py",
        "        self.meter.live -= self.nbytes",
        "        self.meter.live -= 0",
        "saved tensors never counted as released",
        (f"{LM}/test_memory.py",),
    ),
    # lazymaml/lazy.py
    Mutant(
        "eta-without-gamma",
        "lazymaml/lazy.py",
        "eta = loop.leap * loop.inner_lr * (",
        "eta = loop.inner_lr * (",
        "η = α instead of γα: exact only when γ = 1",
        (f"{LM}/test_lazy.py",),
    ),
    Mutant(
        "eta-horizon-is-single",
        "lazymaml/lazy.py",
        '(loop.steps if jacobian_step == "horizon" else 1)',
        '(1 if jacobian_step == "horizon" else 1)',
        '"horizon" silently the same as "single"',
        (f"{LM}/test_estimators.py",),
    ),
    Mutant(
        "eta-at-k0",
        "lazymaml/lazy.py",
        "return eta if loop.steps > 0 else 0.0",
        "return eta",
        "a Jacobian step taken although no inner step was",
        (f"{LM}/test_lazy.py",),
    ),
    Mutant(
        "lazy-hvp-sign",
        "lazymaml/lazy.py",
        "return {n: v[n] - eta * h[n] for n in v}, loss",
        "return {n: v[n] + eta * h[n] for n in v}, loss",
        "the Jacobian I + ηH instead of I − ηH",
        (f"{LM}/test_lazy.py",),
    ),
    # lazymaml/derivatives.py
    Mutant(
        "support-gradient-no-graph",
        "lazymaml/derivatives.py",
        "return list(torch.autograd.grad(loss, adapted, create_graph=True, allow_unused=True))",
        "return list(torch.autograd.grad(loss, adapted, create_graph=False, allow_unused=True))",
        "create_graph forgotten: the HVP silently vanishes",
        (f"{LM}/test_lazy.py",),
    ),
    # lazymaml/bound.py
    Mutant(
        "bound-t0-plus",
        "lazymaml/bound.py",
        "matrix_norm(eye - loop.inner_lr * projected, ord=2)",
        "matrix_norm(eye + loop.inner_lr * projected, ord=2)",
        "‖T₀‖ computed as ‖I + αH‖",
        (f"{LM}/test_lazy.py",),
    ),
    Mutant(
        "bound-growth-from-h0",
        "lazymaml/bound.py",
        "for h in self.hessian_norms[1:]) - 1",
        "for h in self.hessian_norms) - 1",
        "the product over k = 0 … K−1 instead of 1 … K−1 (looser, still a bound)",
        (f"{LM}/test_lazy.py",),
    ),
    Mutant(
        "bound-unprojected",
        "lazymaml/bound.py",
        "torch.full_like(t, float(k in student.adapted))",
        "torch.full_like(t, 1.0)",
        "E_A forgotten: the Hessian of every parameter, not just the adapted ones",
        (f"{LM}/test_lazy.py",),
    ),
    # lazymaml/graph.py
    Mutant(
        "straight-through-undetached",
        "lazymaml/graph.py",
        "psi[n] = psi[n] - eta * (g - g.detach())",
        "psi[n] = psi[n] - eta * g",
        "stop-gradient forgotten: ψ no longer has the teacher's value",
        (f"{LM}/test_lazy.py",),
    ),
    # gradcheck/finite_differences.py
    Mutant(
        "fd-typical-size-full-norm",
        "gradcheck/finite_differences.py",
        "typical = g.norm().item() / math.sqrt(g.numel())",
        "typical = g.norm().item()",
        "the typical size of ⟨g, u⟩ taken as ‖g‖, not ‖g‖/√n: a 1e-5 error passes",
        (f"{GC}/test_finite_differences.py",),
    ),
    Mutant(
        "fd-double-step-at-h",
        "gradcheck/finite_differences.py",
        "ts = (step / 2, step, 2 * step)",
        "ts = (step / 2, step, step)",
        "D(2h) evaluated at h: the error estimate and the smoothness test see nothing",
        (f"{GC}/test_finite_differences.py",),
    ),
    Mutant(
        "fd-no-retries",
        "gradcheck/finite_differences.py",
        "STEPS = (1.0, 0.1, 0.01)",
        "STEPS = (1.0,)",
        "a kink near θ makes the direction inconclusive although a smaller step resolves it",
        (f"{GC}/test_fd_kinks.py",),
    ),
    Mutant(
        "fd-ok-without-quorum",
        "gradcheck/finite_differences.py",
        "return not self.failed and 2 * len(self.inconclusive) <= len(self.directions)",
        "return not self.failed",
        "a check where nothing is conclusive passes",
        (f"{GC}/test_fd_kinks.py",),
    ),
    Mutant(
        "fd-coordinate-one-sided-scale",
        "gradcheck/finite_differences.py",
        "g[i] = (f_plus - f_minus) / (2 * eps)",
        "g[i] = (f_plus - f_minus) / eps",
        "the central difference divided by h instead of 2h",
        (f"{GC}/test_finite_differences.py",),
    ),
    # gradcheck/compare.py
    Mutant(
        "report-ok-ignores-overall",
        "gradcheck/compare.py",
        "for r in (*self.rows, self.overall))",
        "for r in self.rows)",
        "rows each just under atol pass although together they do not",
        (f"{GC}/test_compare.py",),
    ),
    Mutant(
        "row-ok-without-atol",
        "gradcheck/compare.py",
        "self.abs_error <= atol + rtol * scale",
        "self.abs_error <= rtol * scale",
        "atol ignored: a zero reference can never pass",
        (f"{GC}/test_compare.py",),
    ),
    Mutant(
        "negligible-threshold-eps",
        "gradcheck/compare.py",
        "and row.reference_norm <= math.sqrt(self.eps) * self.overall.reference_norm",
        "and row.reference_norm <= self.eps * self.overall.reference_norm",
        "≈0 threshold ε instead of √ε: rounding-level rows shown as alarming ratios",
        (f"{GC}/test_compare.py",),
    ),
    # gradcheck/validate.py
    Mutant(
        "validate-gradient-ok-mean-only",
        "gradcheck/validate.py",
        "return all(r.ok(rtol, atol) for r in (*self.tasks, self.overall))",
        "return self.overall.ok(rtol, atol)",
        "per-task errors that cancel in the mean pass",
        (f"{GC}/test_validate.py",),
    ),
    Mutant(
        "validate-ok-ignores-side-effects",
        "gradcheck/validate.py",
        "return self.gradient_ok(rtol, atol) and not self.side_effects",
        "return self.gradient_ok(rtol, atol)",
        "ok() no longer strict: a candidate that writes the model passes",
        (f"{GC}/test_validate.py",),
    ),
    Mutant(
        "validate-mean-sums",
        "gradcheck/validate.py",
        "k: torch.stack([g[k] for g in grads]).mean(0)",
        "k: torch.stack([g[k] for g in grads]).sum(0)",
        "the reference meta-batch gradient summed",
        (f"{GC}/test_validate.py",),
    ),
    # gradcheck/diagnose.py
    Mutant(
        "diagnose-scale-inverted",
        "gradcheck/diagnose.py",
        "scale = torch.dot(c, g).item() / torch.dot(g, g).item()",
        "scale = torch.dot(c, g).item() / torch.dot(c, c).item()",
        "the least-squares scale of g onto c instead of c onto g",
        (f"{GC}/test_diagnose.py",),
    ),
    Mutant(
        "diagnose-fit-never-stalls",
        "gradcheck/diagnose.py",
        "if (residual - step * slope).norm() > STALL * residual.norm():",
        "if False:",
        "a 1-D fit that spends its whole budget on discrepancies it cannot explain",
        (f"{GC}/test_diagnose.py",),
    ),
    # lazymaml/estimators.py
    Mutant(
        "cg-steepest-descent",
        "lazymaml/estimators.py",
        "p = r + (rr / rr_old) * p",
        "p = r",
        "conjugate gradient degraded to steepest descent",
        (f"{LM}/test_estimators.py",),
    ),
    Mutant(
        "reptile-without-k",
        "lazymaml/estimators.py",
        "scale = 1 / (loop.steps * loop.inner_lr) if loop.steps else 0.0",
        "scale = 1 / loop.inner_lr if loop.steps else 0.0",
        "Reptile's displacement not divided by K",
        (f"{LM}/test_estimators.py",),
    ),
    Mutant(
        "truncated-one-step-short",
        "lazymaml/estimators.py",
        "for k in range(loop.steps - horizon, loop.steps):",
        "for k in range(loop.steps - horizon + 1, loop.steps):",
        "an off-by-one in the unrolled window",
        (f"{LM}/test_estimators.py",),
    ),
    Mutant(
        "imaml-leap-ignored",
        "lazymaml/estimators.py",
        "return {n: (1 - loop.leap) * v[n] + loop.leap * g[n] for n in v}, loss",
        "return {n: g[n] for n in v}, loss",
        "iMAML ignores γ",
        (f"{LM}/test_estimators.py",),
    ),
    # lazymaml/learner.py
    Mutant(
        "learner-sum-not-mean",
        "lazymaml/learner.py",
        "mean, loss = {n: s / len(losses) for n, s in sums.items()}, loss / len(losses)",
        "mean, loss = dict(sums), loss",
        "meta_backward sums the meta-batch (gradient and loss) instead of averaging",
        (f"{LM}/test_learner.py",),
    ),
    Mutant(
        "learner-overwrites-grad",
        "lazymaml/learner.py",
        "p.grad.add_(mean[name].to(p.dtype))",
        "p.grad.copy_(mean[name].to(p.dtype))",
        "meta_backward overwrites p.grad instead of accumulating like backward()",
        (f"{LM}/test_learner.py",),
    ),
    Mutant(
        "learner-first-order-is-lazy",
        "lazymaml/learner.py",
        'eta = 0.0 if estimator == "first_order" else resolve_jacobian_step(step, loop)',
        "eta = resolve_jacobian_step(step, loop)",
        'estimator="first_order" silently lazy',
        (f"{LM}/test_learner.py",),
    ),
    # lazymaml/batched.py, normalization.py, distributed.py
    Mutant(
        "batched-lazy-sign",
        "lazymaml/batched.py",
        "return {n: v[n] - eta * h[n] for n in v}, loss, losses",
        "return {n: v[n] + eta * h[n] for n in v}, loss, losses",
        "the batched Jacobian I + ηH",
        (f"{LM}/test_batched.py",),
    ),
    Mutant(
        "batched-query-at-student",
        "lazymaml/batched.py",
        "v, loss = grad_and_value(inner.query)(apply_leap(theta, phi, inner.loop.leap), frozen)",
        "v, loss = grad_and_value(inner.query)(phi, frozen)",
        "the batched path scores φ_K whatever γ is",
        (f"{LM}/test_batched.py",),
    ),
    Mutant(
        "batched-reptile-without-k",
        "lazymaml/batched.py",
        "scale = 1 / (inner.loop.steps * inner.loop.inner_lr) if inner.loop.steps else 0.0",
        "scale = 1 / inner.loop.inner_lr if inner.loop.steps else 0.0",
        "the batched Reptile displacement not divided by K",
        (f"{LM}/test_batched.py",),
    ),
    Mutant(
        "batched-truncation-loses-jacobian",
        "lazymaml/batched.py",
        "phi = {n: t[n] + (start[n] - theta[n]) for n in t}",
        "phi = dict(start)",
        "the first K − T steps cut from the graph instead of counting as the identity",
        (f"{LM}/test_batched.py",),
    ),
    Mutant(
        "batched-adam-no-bias-correction",
        "lazymaml/batched.py",
        "correction1, correction2 = 1 - self.beta1**self.t, (1 - self.beta2**self.t) ** 0.5",
        "correction1, correction2 = 1.0, 1.0",
        "the functional Adam without bias correction",
        (f"{LM}/test_batched.py",),
    ),
    Mutant(
        "batched-active-dropout-accepted",
        "lazymaml/batched.py",
        "if kind is nn.Dropout and module.training and module.p > 0:",
        "if kind is nn.Dropout and module.p > 1:",
        "active dropout batched: random masks differ from the sequential path",
        (f"{LM}/test_batched.py",),
    ),
    Mutant(
        "norm-keeps-running-statistics",
        "lazymaml/normalization.py",
        'arguments["running_mean"] = arguments["running_var"] = None',
        'arguments["momentum"] = arguments.get("momentum", 0.1)',
        "train-mode normalisation under vmap still handed unbatched running statistics",
        (f"{LM}/test_batched.py",),
    ),
    Mutant(
        "distributed-mean-by-local-count",
        "lazymaml/distributed.py",
        "mean = unflat(vector[:-3] / total, sums)",
        "mean = unflat(vector[:-3] / count, sums)",
        "the all-reduced sum divided by this rank's task count",
        (f"{LM}/test_distributed.py",),
    ),
    # lazymaml/datasets.py
    Mutant(
        "dataset-support-and-query-overlap",
        "lazymaml/datasets.py",
        "            query.append(drawn[shots:])",
        "            query.append(drawn[shots - 1 : -1])",
        "the query set shares an image with the support set",
        (f"{LM}/test_datasets.py",),
    ),
    Mutant(
        "dataset-labels-by-class-index",
        "lazymaml/datasets.py",
        "torch.arange(ways).repeat_interleave(per_class)",
        "torch.arange(ways).repeat(per_class)",
        "labels interleaved while images are grouped by class",
        (f"{LM}/test_datasets.py",),
    ),
    Mutant(
        "dataset-rotation-by-same-angle",
        "lazymaml/datasets.py",
        "turned = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]",
        "turned = [torch.rot90(x, 1, dims=(2, 3)) for k in range(4)]",
        "every rotation class holds the same images",
        (f"{LM}/test_datasets.py",),
    ),
    # lazymaml/report.py
    Mutant(
        "report-identity-unchecked",
        "lazymaml/report.py",
        'if self.estimator == "lazy" and self.steps == 1 and self.rel_error > IDENTITY_RTOL:',
        'if self.estimator == "lazy" and self.steps == 0 and self.rel_error > IDENTITY_RTOL:',
        "the K = 1 identity never checked by the report",
        ("tests/test_cli.py",),
    ),
]
