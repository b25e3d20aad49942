"""MAML meta-gradients the way users write them: correct ones, and each classic bug on purpose.

Each function has the ``validate`` candidate signature ``(model, task, steps, inner_lr)`` (or
``(model, tasks, …)`` for meta-batch candidates) and returns a gradient dict, or ``None`` after
writing ``p.grad``.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch.func import functional_call

from gradcheck import Task, TaskBatch
from gradcheck._higher import higher


def functional_maml(
    model,
    task,
    steps,
    inner_lr,
    *,
    create_graph=True,
    sign=-1.0,
    lr_scale=1.0,
    swap=False,
    share_buffers=False,
    adapt=None,
    extra_steps=0,
    lr_dtype=None,
    leap=1.0,
):
    """MAML with ``torch.func``; each keyword other than the defaults plants one bug.

    ``adapt``: a predicate on names, the parameters the inner loop updates (others stay θ);
    ``extra_steps``: K + extra_steps inner steps; ``lr_dtype``: α held as a 0-dim tensor of that
    dtype (float32: α rounded, the product promoted back to float64); ``leap``: the query loss
    scored at θ + γ(φ_K − θ).
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    if not share_buffers:  # running statistics must stay out of the user's model
        buffers = {n: b.clone() for n, b in buffers.items()}
    support, query = task.support_loss, task.query_loss
    if swap:
        support, query = query, support

    def at(tensors):
        return lambda x: functional_call(model, {**tensors, **buffers}, (x,))

    lr = inner_lr * lr_scale if lr_dtype is None else torch.tensor(inner_lr * lr_scale, dtype=lr_dtype)
    adapted = adapt or (lambda name: True)
    phi = params
    for _ in range(steps + extra_steps):
        grads = torch.autograd.grad(support(at(phi)), list(phi.values()), create_graph=create_graph)
        phi = {n: p + sign * lr * g if adapted(n) else p for (n, p), g in zip(phi.items(), grads)}
    teacher = phi if leap == 1 else {n: t + leap * (phi[n] - t) for n, t in params.items()}
    return dict(zip(params, torch.autograd.grad(query(at(teacher)), list(params.values()))))


def _clone(module, share_buffers=False):
    """learn2learn's ``clone_module`` idea: a copy whose parameters are differentiable clones;
    ``share_buffers=True`` keeps the original's buffers, so BatchNorm statistics land in them."""
    twin = copy.deepcopy(module)
    for mine, theirs in zip(twin.modules(), module.modules()):
        for key, p in theirs._parameters.items():
            if p is not None:
                mine._parameters[key] = p.clone()
        if share_buffers:
            mine._buffers.update(theirs._buffers)
    return twin


def _update(module, grads, lr):
    """learn2learn's ``update_module`` idea: replace each parameter by p − lr·g, keeping the graph."""
    grads = iter(grads)
    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = p - lr * next(grads)


def clone_adapt_maml(model, task, steps, inner_lr, share_buffers=False):
    """learn2learn-style clone/adapt in plain torch; the meta-gradient lands in ``p.grad``."""
    learner = _clone(model, share_buffers)
    for _ in range(steps):
        loss = task.support_loss(learner)
        _update(learner, torch.autograd.grad(loss, list(learner.parameters()), create_graph=True), inner_lr)
    task.query_loss(learner).backward()


def torchopt_maml(model, task, steps, inner_lr):
    """torchopt's ``MetaSGD`` on the model itself, state extracted and recovered around it."""
    import torchopt

    names, theta = zip(*model.named_parameters())
    saved = torchopt.extract_state_dict(model)
    optimizer = torchopt.MetaSGD(model, lr=inner_lr)
    for _ in range(steps):
        optimizer.step(task.support_loss(model))
    grads = torch.autograd.grad(task.query_loss(model), theta)
    torchopt.recover_state_dict(model, saved)
    return dict(zip(names, grads))


def higher_default_maml(model, task, steps, inner_lr):
    """``higher.innerloop_ctx`` with its default ``copy_initial_weights=True``: θ is detached."""
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=inner_lr)) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(task.support_loss(fmodel))
        task.query_loss(fmodel).backward()


def meta_batch_mean(model, tasks, steps, inner_lr, reduce=torch.mean):
    """A meta-batch candidate looping over the tasks; ``reduce=torch.sum`` is the classic bug."""
    grads = [functional_maml(model, t, steps, inner_lr) for t in tasks]
    return {n: reduce(torch.stack([g[n] for g in grads]), 0) for n in grads[0]}


def vmap_maml(model, tasks, steps, inner_lr):
    """A meta-batch MAML as written with ``torch.func``: the inner loop of every task at once with
    ``grad`` inside ``vmap`` (over the stacked tasks), the meta-gradient by ordinary autograd
    through it. Exact without normalisation; wrong with ``BatchNorm2d`` (torch's batching rule for
    batch_norm's backward, see notebook 02)."""
    batch = tasks if isinstance(tasks, TaskBatch) else Task.stack(list(tasks))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        return batch.loss(functional_call(model, {**p, **buffers}, (x,)), y)

    def query_after_inner_loop(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = torch.func.grad(loss)(p, xs, ys)
            p = {n: p[n] - inner_lr * g[n] for n in p}
        return loss(p, xq, yq)

    (xs, ys), (xq, yq) = batch.support, batch.query
    losses = torch.func.vmap(query_after_inner_loop, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq)
    return dict(zip(params, torch.autograd.grad(losses.mean(), list(params.values()))))


def autograd_lazy(model, task, steps, inner_lr, *, extra_steps=0):
    """The lazy meta-gradient written with plain autograd on cloned tensors (not ``torch.func``):
    K graph-free SGD steps φ_{k+1} = φ_k − α∇L_S(φ_k), v = ∇L_Q(φ_K), and
    g = v − α ∇_θ⟨∇L_S(θ), v⟩ by double backward. ``extra_steps`` plants an off-by-one."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def at(tensors):
        return lambda x: functional_call(model, {**tensors, **buffers}, (x,))

    phi = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(steps + extra_steps):
        leaves = {n: t.requires_grad_() for n, t in phi.items()}
        grads = torch.autograd.grad(task.support_loss(at(leaves)), list(leaves.values()))
        phi = {n: (t - inner_lr * g).detach() for (n, t), g in zip(leaves.items(), grads)}
    leaves = {n: t.requires_grad_() for n, t in phi.items()}
    v = torch.autograd.grad(task.query_loss(at(leaves)), list(leaves.values()))
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    support = torch.autograd.grad(task.support_loss(at(theta)), list(theta.values()), create_graph=True)
    inner = sum((s * u).sum() for s, u in zip(support, v))
    correction = torch.autograd.grad(inner, list(theta.values()))
    eta = inner_lr if steps + extra_steps > 0 else 0.0
    return {n: u - eta * h for n, u, h in zip(params, v, correction)}


def summed_lazy(model, tasks, steps, inner_lr):
    """A meta-batch lazy candidate that sums over its tasks instead of taking their mean."""
    grads = [autograd_lazy(model, t, steps, inner_lr) for t in tasks]
    return {n: torch.stack([g[n] for g in grads]).sum(0) for n in grads[0]}


CORRECT = {
    "functional (torch.func)": functional_maml,
    "clone/adapt (learn2learn-style)": clone_adapt_maml,
    "torchopt MetaSGD": torchopt_maml,
}
BROKEN = {
    "missing create_graph": functools.partial(functional_maml, create_graph=False),
    "wrong sign of the inner step": functools.partial(functional_maml, sign=1.0),
    "learning rate applied twice": lambda m, t, k, lr: functional_maml(m, t, k, lr, lr_scale=lr),
    "support and query swapped": functools.partial(functional_maml, swap=True),
    "initial weights detached (higher's default)": higher_default_maml,
}


def hook_lazy(model, task, steps, inner_lr, *, bug=None):
    """A lazy meta-gradient as a user writes it with backward hooks, in plain autograd.

    K graph-free SGD steps give φ_K and the derived gradient d = (θ − φ_K)/α; then one
    differentiable step from θ in which a hook on each θ makes the inner ``autograd.grad`` return
    g′ = g + (d − g).detach() — the value d, the derivative that of g = ∇L_S(θ) — so that
    ψ = θ − α g′ has φ_K's value and the one-step Jacobian I − αH(θ): g = (I − αH(θ)) ∇L_Q(φ_K).

    ``bug`` plants one mistake: ``"late_hooks"`` registers the hooks on θ only after the inner
    ``autograd.grad`` (they never fire: ψ is one SGD step from θ, one-step MAML);
    ``"tensor_hooks"`` registers them on the inner-gradient tensors instead of θ (a tensor hook
    rewrites the gradient flowing back into that tensor, never its value: ψ is one SGD step from
    θ, and the backward into g becomes d: g = ∇L_Q(φ_1) + H(θ) d); ``"hook_returns_d"`` returns d itself (no
    Hessian term); ``"attached_d"`` builds d from θ with its graph, so θ − α·d = φ_K cancels θ;
    ``"no_divide"`` forgets ÷α, d = θ − φ_K; ``"horizon_step"`` divides by Kα and steps by Kα
    (ψ has φ_K's value and the Jacobian I − KαH(θ): ``jacobian_step="horizon"``).
    """
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def at(tensors):
        return lambda x: functional_call(model, {**tensors, **buffers}, (x,))

    phi = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(steps):
        leaves = {n: t.requires_grad_() for n, t in phi.items()}
        grads = torch.autograd.grad(task.support_loss(at(leaves)), list(leaves.values()))
        phi = {n: (t - inner_lr * g).detach() for (n, t), g in zip(leaves.items(), grads)}
    step = steps * inner_lr if bug == "horizon_step" and steps else inner_lr
    scale = 1.0 if bug == "no_divide" else step
    source = params if bug == "attached_d" else {n: p.detach() for n, p in params.items()}
    d = {n: (source[n] - phi[n]) / scale for n in params}

    def substitute(name):
        if bug == "hook_returns_d":
            return lambda g: d[name]
        return lambda g: g + (d[name] - g).detach()

    handles = []
    if bug not in ("tensor_hooks", "attached_d", "late_hooks"):
        handles = [p.register_hook(substitute(n)) for n, p in params.items()]
    inner = torch.autograd.grad(task.support_loss(at(params)), list(params.values()), create_graph=True)
    if bug == "late_hooks":
        handles = [p.register_hook(substitute(n)) for n, p in params.items()]
    for handle in handles:  # the outer backward reaches θ too: the hooks must not rewrite it
        handle.remove()
    if bug == "tensor_hooks":
        for n, g in zip(params, inner):
            g.register_hook(substitute(n))
    if bug == "attached_d":
        inner = [d[n] for n in params]  # the derived gradient used as the inner gradient directly
    psi = {n: p - step * g for (n, p), g in zip(params.items(), inner)}
    return dict(zip(params, torch.autograd.grad(task.query_loss(at(psi)), list(params.values()))))


def summed_hook_lazy(model, tasks, steps, inner_lr):
    """A meta-batch hook candidate that sums over its tasks instead of taking their mean."""
    grads = [hook_lazy(model, t, steps, inner_lr) for t in tasks]
    return {n: torch.stack([g[n] for g in grads]).sum(0) for n in grads[0]}


def functional_maml_momentum_adamw(
    model,
    task,
    steps,
    inner_lr,
    *,
    optimizer="momentum",
    momentum=0.9,
    nesterov=False,
    weight_decay=0.0,
    create_graph=True,
):
    """Second-order MAML with ``torch.func`` and an inner optimizer written out from
    ``torch.optim``'s documented update (not gradcheck.optim's): ``"momentum"`` is SGD with
    momentum μ (buffer b₁ = g₁, b ← μb + g; Nesterov g + μb) and L2 weight decay; ``"adamw"`` is
    AdamW (β = (0.9, 0.999), ε = 1e-8, decoupled decay p ← p(1 − αλ)). ``create_graph=False``
    is first-order by mistake."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def at(tensors):
        return lambda x: functional_call(model, {**tensors, **buffers}, (x,))

    phi, state = params, {}
    for t in range(1, steps + 1):
        loss = task.support_loss(at(phi))
        grads = dict(zip(phi, torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)))
        new = {}
        for n, p in phi.items():
            g = grads[n]
            if optimizer == "momentum":
                g = g + weight_decay * p
                b = g if t == 1 else momentum * state[n] + g
                state[n] = b
                new[n] = p - inner_lr * (g + momentum * b if nesterov else b)
            else:
                m, v = state.get(n, (torch.zeros_like(p), torch.zeros_like(p)))
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                state[n] = (m, v)
                m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
                root = torch.where(v_hat > 0, v_hat, torch.ones_like(v_hat)).sqrt() * (v_hat > 0)
                new[n] = p * (1 - inner_lr * weight_decay) - inner_lr * m_hat / (root + 1e-8)
        phi = new
    return dict(zip(params, torch.autograd.grad(task.query_loss(at(phi)), list(params.values()))))


# Learned inner rates: ports of Meta-SGD, MAML++ and a learned scalar α, written as a user would,
# each with its rate gradients in the returned dict, and the classic mistakes on purpose.


class MetaSGD(torch.nn.Module):
    """learn2learn's Meta-SGD layout: the learner under ``module`` and one rate tensor per
    parameter, of the parameter's shape, under ``lrs`` (parameters of this module, so the
    meta-gradient of ``lrs.i`` sits beside that of ``module.<name>``). The inner step is
    p − lr ⊙ g."""

    def __init__(self, model, lr):
        super().__init__()
        self.module = model
        self.lrs = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full_like(p.detach(), lr)) for p in model.parameters()]
        )

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def inner_lr(self):
        """The rates as gradcheck takes them: {adapted parameter's name: its rate tensor}."""
        return {f"module.{n}": lr for (n, _), lr in zip(self.module.named_parameters(), self.lrs)}


def _materialized(names, tensors, grads):
    """{name: gradient}, zeros where autograd found no path (as ``p.grad`` left None reads)."""
    return {n: torch.zeros_like(t) if g is None else g for n, t, g in zip(names, tensors, grads)}


def meta_sgd_maml(model, task, steps, inner_lr, *, create_graph=True, detach_rates=False):
    """Meta-SGD on a :class:`MetaSGD` the learn2learn way, in plain torch: ``clone`` the learner
    (differentiable clones of its parameters), ``adapt`` it K times by p ← p − lr ⊙ g with
    ``create_graph=True``, then differentiate the query loss with respect to every parameter of
    the wrapper — the learner's θ and the rates. ``inner_lr`` (the same rates, as a mapping) is
    not read: the rates live in the model. ``create_graph=False`` is first-order by mistake;
    ``detach_rates`` steps with ``lr.detach()`` (the rates get no meta-gradient)."""
    learner = _clone(model.module)
    rates = [lr.detach() if detach_rates else lr for lr in model.lrs]
    for _ in range(steps):
        params = list(learner.parameters())
        grads = torch.autograd.grad(task.support_loss(learner), params, create_graph=create_graph)
        fast = iter(p - lr * g for p, lr, g in zip(params, rates, grads))
        for m in learner.modules():
            for key, p in m._parameters.items():
                if p is not None:
                    m._parameters[key] = next(fast)
    names, every = zip(*model.named_parameters())
    grads = torch.autograd.grad(task.query_loss(learner), every, allow_unused=True)
    return _materialized(names, every, grads)


def learned_alpha_maml(model, task, steps, inner_lr, *, create_graph=True, detach_rates=False):
    """MAML with one learned scalar α (``inner_lr``, a 0-dim tensor that requires grad) shared
    by every entry, with ``torch.func.functional_call``: φ ← φ − α g, and the meta-gradient with
    respect to θ and to α (key ``"inner_lr"``). ``create_graph=False`` is first-order by mistake;
    ``detach_rates`` steps with ``α.detach()``."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    alpha = inner_lr.detach() if detach_rates else inner_lr

    def at(tensors):
        return lambda x: functional_call(model, {**tensors, **buffers}, (x,))

    phi = params
    for _ in range(steps):
        grads = torch.autograd.grad(task.support_loss(at(phi)), list(phi.values()), create_graph=create_graph)
        phi = {n: p - alpha * g for (n, p), g in zip(phi.items(), grads)}
    wrt = [*params.values(), inner_lr]
    grads = torch.autograd.grad(task.query_loss(at(phi)), wrt, allow_unused=True)
    return _materialized([*params, "inner_lr"], wrt, grads)


class PerStepBatchNorm2d(torch.nn.Module):
    """MAML++'s per-step batch normalisation: weight, bias and running statistics of shape
    (K, C), row k used at inner step k (``forward(x, num_step=k)``); normalised with the batch's
    statistics (training mode), the running ones updated in place in row k."""

    def __init__(self, channels, steps, momentum=0.1, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(steps, channels))
        self.bias = torch.nn.Parameter(torch.zeros(steps, channels))
        self.register_buffer("running_mean", torch.zeros(steps, channels))
        self.register_buffer("running_var", torch.ones(steps, channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x, num_step):
        return torch.nn.functional.batch_norm(
            x,
            self.running_mean[num_step],
            self.running_var[num_step],
            self.weight[num_step],
            self.bias[num_step],
            training=True,
            momentum=self.momentum,
            eps=self.eps,
        )


class MAMLPlusPlusNet(torch.nn.Module):
    """A small MAML++ network: conv (no bias: BatchNorm follows) → per-step BatchNorm → tanh →
    linear head, called ``net(x, num_step=k)``. As in MAML++, the inner loop adapts the conv and
    linear tensors (:data:`MAMLPP_ADAPTED`), not the normalisation's."""

    def __init__(self, steps, classes=3, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 3, 3, bias=False)
        self.norm = PerStepBatchNorm2d(3, steps)
        self.head = torch.nn.Linear(3 * 4 * 4, classes)
        self.to(dtype)
        with torch.no_grad():  # non-trivial normalisation parameters and statistics, per step
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
            self.norm.running_mean.uniform_(-0.3, 0.3)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x, num_step):
        return self.head(torch.tanh(self.norm(self.conv(x), num_step)).flatten(1))


MAMLPP_ADAPTED = ("conv.weight", "head.weight", "head.bias")


def lslr_rates(model, steps, lr, spread=0.0, seed=0):
    """MAML++'s LSLR: for every adapted tensor one learned rate per step, K + 1 of them (the
    last is never used), initialised to ``lr`` (+ a seeded ±``spread`` so that steps differ)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for name in MAMLPP_ADAPTED:
        jitter = spread * (2 * torch.rand(steps + 1, generator=g, dtype=torch.float64) - 1)
        out[name] = (lr + jitter).to(params[name].dtype).requires_grad_(True)
    return out


def multi_step_weights(steps, epoch, anneal_epochs):
    """MAML++'s per-step loss importance at ``epoch``: uniform 1/K at epoch 0; every epoch each
    non-final weight loses 1/(K·E) (E = ``anneal_epochs``, floor 0.03/K) and the final one gains
    what they lose (cap 1 − (K − 1)·0.03/K)."""
    weights = [1.0 / steps] * steps
    decay, floor = 1.0 / steps / anneal_epochs, 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1 - (steps - 1) * floor)
    return weights


def maml_plus_plus(
    model,
    task,
    steps,
    inner_lr,
    *,
    query_weights=None,
    create_graph=True,
    detach_rates=False,
    shared_steps=False,
    share_buffers=False,
):
    """MAML++ as its reference code runs it, with ``functional_call`` over a weights dict: step k
    calls ``net(x, num_step=k)`` and updates each adapted tensor by w ← w − α[w][k] ⊙ g (LSLR:
    ``inner_lr`` maps each adapted name to its K + 1 rates); the multi-step loss adds
    w_k L_Q(φ_{k+1}), the query scored right after step k with ``num_step=k`` (only the final
    one, at K − 1, when ``query_weights`` is None). Buffers are cloned per task (the model's
    running statistics stay as they were). Returns the meta-gradient of θ and of each rate
    (``"inner_lr.<name>"``). Mistakes: ``create_graph=False`` (first-order by mistake),
    ``detach_rates`` (``α.detach()``), ``shared_steps`` (α[w][0] at every step: the rates are
    not per step), ``share_buffers`` (the model's own running statistics, written in place: a
    side effect, the gradient unchanged)."""
    params = dict(model.named_parameters())
    buffers = {n: b if share_buffers else b.clone() for n, b in model.named_buffers()}
    rates = {n: r.detach() if detach_rates else r for n, r in inner_lr.items()}

    def net(tensors, k):
        return lambda x: functional_call(model, {**tensors, **buffers}, (x,), {"num_step": k})

    weights = [0.0] * (steps - 1) + [1.0] if query_weights is None else list(query_weights)
    phi, objective = dict(params), 0.0
    for k in range(steps):
        adapted = [phi[n] for n in inner_lr]
        grads = torch.autograd.grad(task.support_loss(net(phi, k)), adapted, create_graph=create_graph)
        for (n, p), g in zip(zip(inner_lr, adapted), grads):
            phi[n] = p - rates[n][0 if shared_steps else k] * g
        if weights[k]:
            objective = objective + weights[k] * task.query_loss(net(phi, k))
    wrt = [*params.values(), *inner_lr.values()]
    grads = torch.autograd.grad(objective, wrt, allow_unused=True)
    return _materialized([*params, *(f"inner_lr.{n}" for n in inner_lr)], wrt, grads)
