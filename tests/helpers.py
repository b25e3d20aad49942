"""Models, tasks and an *independent* exact meta-gradient shared by the tests.

Besides the small MLPs and the conv + BatchNorm network, two models that stress the "model left
as it was" guarantee: ``stats_net``, whose forward writes statistics kept as frozen parameters
and as buffers in place through ``.data``, and ``VarsNet``, a hand-written learner that overrides
``parameters()``.

``reference_meta_gradient`` is written from the definition with ``torch.func.functional_call``
over one flat parameter vector — no ``higher``, no project code beyond ``Task`` — so that the
oracle is checked against something that shares none of its machinery.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradcheck import Task, strategies

F64 = torch.float64
ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid}


def mlp(widths, activation="tanh", seed=0, dtype=F64) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).to(dtype)


def regression_task(seed=0, inputs=2, outputs=1, shots=6, queries=7, dtype=F64) -> Task:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(inputs, outputs, generator=g, dtype=F64)

    def batch(n):
        x = torch.randn(n, inputs, generator=g, dtype=F64)
        return x.to(dtype), torch.sin(x @ w).to(dtype)

    return Task(batch(shots), batch(queries), F.mse_loss)


def conv_bn(seed=0, dtype=F64) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(dtype)
    with torch.no_grad():  # non-trivial affine BatchNorm parameters and running statistics
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def image_task(seed=0, dtype=F64, shots=2, queries=3) -> Task:
    g = torch.Generator().manual_seed(seed)

    def batch(per_class):
        y = torch.arange(3).repeat_interleave(per_class)
        x = torch.randn(len(y), 1, 6, 6, generator=g, dtype=F64) + y.view(-1, 1, 1, 1)
        return x.to(dtype), y

    return Task(batch(shots), batch(queries), F.cross_entropy)


class Statistics(nn.Module):
    """Running statistics kept as frozen parameters (``mean``, ``var``: a cumulative average) and
    as buffers (``running_mean``, ``running_var``: momentum 0.1; ``count``), all written in place
    through ``.data`` in training. ``running=True`` normalises with the statistics just written,
    otherwise with the batch's own (BatchNorm in training); in eval mode with ``mean``/``var``."""

    def __init__(self, features: int, running: bool):
        super().__init__()
        self.running = running
        self.mean = nn.Parameter(torch.zeros(features, dtype=F64), requires_grad=False)
        self.var = nn.Parameter(torch.ones(features, dtype=F64), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(features, dtype=F64))
        self.register_buffer("running_var", torch.ones(features, dtype=F64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            mean, var = x.detach().mean(0), x.detach().var(0)
            self.count.data += 1
            self.mean.data.lerp_(mean, 1.0 / int(self.count))
            self.var.data.lerp_(var, 1.0 / int(self.count))
            self.running_mean.data.lerp_(mean, 0.1)
            self.running_var.data.lerp_(var, 0.1)
        if self.running or not self.training:
            return (x - self.mean) / (self.var + 1e-5).sqrt()
        return (x - x.mean(0)) / (x.var(0) + 1e-5).sqrt()


def stats_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        Statistics(3, running=True), nn.Linear(3, 6), Statistics(6, running=False), nn.Tanh(), nn.Linear(6, 2)
    ).to(F64)
    with torch.no_grad():  # statistics as a model mid-training has them
        for m in (net[0], net[2]):
            m.mean.uniform_(-0.5, 0.5)
            m.var.uniform_(0.5, 2.0)
            m.running_mean.copy_(m.mean)
            m.running_var.copy_(m.var)
            m.count.fill_(3)
    return net


def stats_task(seed=0):
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        x = 2 * torch.randn(n, 3, generator=g, dtype=F64) + 1
        return x, torch.sin(x[:, :2])

    return Task(batch(6), batch(7), F.mse_loss)


class VarsNet(nn.Module):
    """The hand-written MAML learner of a popular repository, as its users write it: the weights
    in ``self.vars`` (an ``nn.ParameterList``), the BatchNorm running statistics in
    ``self.vars_bn`` as frozen parameters, ``forward(x, vars=None, bn_training=True)`` built from
    ``F.conv2d``, ``F.batch_norm`` and ``F.linear``, and ``parameters()`` overridden to return
    ``self.vars`` only. Conv 3×3 (3 channels) → batch norm → tanh → linear, float64, for 6×6
    inputs of ``image_task``."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape, scale=0.3, mean=0.0):
            return nn.Parameter(mean + scale * torch.randn(*shape, generator=g, dtype=torch.float64))

        self.vars = nn.ParameterList(
            [
                weight(3, 1, 3, 3),
                weight(3),
                weight(3, mean=1.0),
                weight(3),
                weight(3, 48, scale=0.2),
                weight(3),
            ]
        )
        running_mean = weight(3, scale=0.1).requires_grad_(False)
        running_var = nn.Parameter(
            1 + 0.5 * torch.rand(3, generator=g, dtype=torch.float64), requires_grad=False
        )
        self.vars_bn = nn.ParameterList([running_mean, running_var])

    def forward(self, x, vars=None, bn_training=True):
        w, b, gamma, beta, head_w, head_b = self.vars if vars is None else vars
        x = nn.functional.conv2d(x, w, b)
        x = nn.functional.batch_norm(x, self.vars_bn[0], self.vars_bn[1], gamma, beta, training=bn_training)
        return nn.functional.linear(torch.tanh(x).flatten(1), head_w, head_b)

    def parameters(self, recurse=True):
        return self.vars

    def plain(self):
        """The same network as an ordinary ``nn.Sequential``, with the same values."""
        conv, bn, head = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(48, 3)
        twin = nn.Sequential(conv, bn, nn.Tanh(), nn.Flatten(), head).double()
        targets = [conv.weight, conv.bias, bn.weight, bn.bias, head.weight, head.bias]
        with torch.no_grad():
            for target, value in zip(
                [*targets, bn.running_mean, bn.running_var], [*self.vars, *self.vars_bn]
            ):
                target.copy_(value)
        return twin


class Spare(nn.Module):
    """A linear layer and a parameter its forward never reads."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1).double()
        self.spare = nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, x):
        return self.linear(x)


def mlp_problems():
    """A small smooth MLP (at least one hidden layer, so "head" and "body" both exist) and a
    regression task of 6 support and 7 query points (``regression_task``'s shapes, so the two
    stack), as ``(model, task)``: gradcheck's own strategy, narrowed."""
    mlps = strategies.problems(kinds=("mlp",), meta_batch=1, shots=6, queries=7)
    return mlps.map(lambda p: (p.model, p.tasks[0]))


def adapted_names(model, adapt):
    """The adapted parameter names, written out independently of gradcheck.parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in names if n.startswith(names[-1].rpartition(".")[0] + ".")]
    return {None: names, "head": head, "body": [n for n in names if n not in head]}[adapt]


class Flat:
    """The model as a function of one flat vector of its trainable parameters (test-side code)."""

    def __init__(self, model, task, adapt=None):
        self.model, self.task = model, task
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [model.get_parameter(n).shape for n in self.names]
        self.sizes = [s.numel() for s in self.shapes]
        adapted = adapted_names(model, adapt)
        self.mask = torch.cat(
            [torch.full((k,), float(n in adapted), dtype=F64) for n, k in zip(self.names, self.sizes)]
        )
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}
        self.theta = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in self.names])

    def at(self, vector):
        tensors = dict(zip(self.names, (t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes))))
        return lambda *x: functional_call(self.model, {**tensors, **self.buffers}, x)

    def support(self, vector):
        return self.task.support_loss(self.at(vector))

    def query(self, vector):
        return self.task.query_loss(self.at(vector))

    def named(self, vector):
        return {n: t.view(s) for n, t, s in zip(self.names, vector.split(self.sizes), self.shapes)}


def reference_meta_gradient(
    model, task, steps, inner_lr, adapt=None, leap=1.0, first_order=False, horizon=None
):
    """g = ∇_θ L_Q(θ + γ(φ_K − θ)), plain SGD on the adapted parameters, by a flat-vector unroll.

    ``horizon=T`` differentiates only the last T steps (the first K − T count as the identity).
    """
    flat = Flat(model, task, adapt)
    theta = flat.theta.clone().requires_grad_()
    phi = theta
    for k in range(steps):
        if horizon is not None and k == steps - horizon:
            phi = theta + (phi - theta).detach()
        (grad,) = torch.autograd.grad(flat.support(phi), phi, create_graph=not first_order)
        phi = phi - inner_lr * flat.mask.to(grad) * grad
    if horizon == 0:
        phi = theta + (phi - theta).detach()
    (g,) = torch.autograd.grad(flat.query(theta + leap * (phi - theta)), theta)
    return flat.named(g)


def model_state(model):
    """Everything a user could observe about a model, deep-copied."""
    return {
        "state_dict": copy.deepcopy(model.state_dict()),
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "ids": [id(t) for t in (*model.parameters(), *model.buffers())],
        "attributes": {  # plain tensor attributes (prune and hook-based weight_norm keep `weight` there)
            f"{prefix}.{key}": value.detach().clone()
            for prefix, module in model.named_modules()
            for key, value in vars(module).items()
            if isinstance(value, torch.Tensor)
        },
    }


def assert_same_state(before, after):
    assert before["modes"] == after["modes"], "train/eval mode changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
    assert before["ids"] == after["ids"], "a parameter or buffer was replaced"
    for k, v in before["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k]), f"{k} changed"
    assert before["attributes"].keys() == after["attributes"].keys(), "tensor attributes added or removed"
    for k, v in before["attributes"].items():
        assert torch.equal(v, after["attributes"][k]), f"attribute {k} changed"
    for k, v in before["grads"].items():
        w = after["grads"][k]
        assert (v is None) == (w is None) and (v is None or torch.equal(v, w)), f"{k}.grad changed"


def with_gradients(model, seed=1):
    """Give every parameter a recognisable .grad, as a user mid-training would have."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model
