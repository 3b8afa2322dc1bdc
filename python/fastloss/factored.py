"""The factored spherical output layer of Vincent, de Brébisson & Bouthillier (NIPS 2015): exact SGD on a V x d
output layer in O(m·d² + m·K·d) per minibatch of m, without touching the V rows that are not targets.

With the bias folded in as an extra input column (``h_a = [h, 1]``, ``W_a = [W | b]``) the layer keeps
``W_a = V·U + 1 cᵀ`` (V: out x d_a in the layer dtype; U, U⁻¹, c: d_a x d_a, d_a in float64), the Gram
``Q = W_aᵀW_a`` and the column sums ``w̄ = W_aᵀ1`` (float64). A spherical loss needs per row only
``μ = w̄·h_a / V``, ``m2 = h_aᵀ(Q − w̄w̄ᵀ/V)h_a`` and the target outputs ``W_a[c]·h_a = V[c]·(U h_a) + c·h_a``.
Its weight gradient ``∇W_a = 2 W_a G + 1 rᵀ + S`` (G = H_aᵀ diag(∂L/∂m2) H_a, r a d_a-vector, S nonzero only on
target rows) turns the SGD step ``W_a ← W_a − lr(∇W_a + wd·W_a·E)`` (E: no decay on the bias column) into
``W_a ← W_a M − lr 1rᵀ − lr S`` with ``M = I − lr·wd·E − 2 lr G``:
``U ← U M``, ``c ← Mᵀc − lr r``, ``U⁻¹ ← M⁻¹U⁻¹`` (Woodbury, an m x m solve), ``V[k] ← V[k] − lr S_k U⁻¹`` on
the target rows, and Q, w̄ by their exact rank-m updates. Periodic exact re-inversion of U, re-factorisation
when U's singular values leave [1/2, 2], and exact recomputation of Q and w̄ keep the rounding in check.

Plain SGD (with weight decay) only: momentum and adaptive optimizers have dense, non-multiplicative updates that
this form cannot represent. For those, use :func:`fastloss.linear_spherical_loss` (exact gradients, any
optimizer, O(V·d²) per step).
"""

from __future__ import annotations

import math

import torch

from . import _ops
from . import _validation as V
from ._autograd import first_order
from ._reduce import mean_over
from .spherical import DEFAULT_EPS, KINDS


class _FactoredLoss(torch.autograd.Function):
    """Mean spherical loss of a minibatch through the factored layer; backward gives dL/dhidden and stashes the
    batch's coefficients in `stash` for :meth:`FactoredSphericalLinear.sgd_step`."""

    @staticmethod
    def forward(ctx, hidden, Vmat, U, c, gram, col_sum, target, target_weight, opts, stash, anchor):
        kind, a, b, eps, ignore_index, bias = opts
        out = Vmat.shape[0]
        h = hidden.to(torch.float64)
        h_a = torch.cat([h, h.new_ones(h.shape[0], 1)], 1) if bias else h
        mean = col_sum / out
        hq = h_a @ (gram - out * torch.outer(mean, mean))
        da = h_a.shape[1]
        stat = torch.cat([mean, mean.new_zeros(da + 2)])
        row = torch.ops.fastloss.spherical_row_stats(h_a, hq, stat)
        bad = (target != ignore_index) & ((target < 0) | (target >= out))  # NaN row, no out-of-bounds read, no sync
        valid = (target != ignore_index) & ~bad
        mu, m2 = torch.where(bad.any(-1), torch.nan, row[:, 0]), row[:, 1]
        safe = torch.where(valid, target, torch.zeros_like(target))
        w_t = Vmat[safe].to(torch.float64) @ U + c  # (m, K, d_a): the target rows of W_a
        oc = (w_t * h_a[:, None, :]).sum(-1)
        rows, coef = torch.ops.fastloss.spherical_row_terms(mu, m2, oc, oc - mu[:, None], target, target_weight,
                                                            kind, a, b, eps, out, ignore_index)
        count = (valid | bad).any(-1).sum().to(rows.dtype)
        ctx.save_for_backward(h_a, hq, coef, w_t, mean, count, valid, target, hidden)  # hidden: for first_order
        ctx.stash, ctx.in_dtype, ctx.d = stash, hidden.dtype, hidden.shape[1]
        return mean_over(rows.sum(), count).to(hidden.dtype)

    @staticmethod
    @first_order  # first-order only: differentiating the result raises (fastloss._autograd)
    def backward(ctx, grad):
        h_a, hq, coef, w_t, mean, count, valid, target, _ = ctx.saved_tensors
        # a batch with nothing counted: zero coefficients (the loss is NaN), not inf * 0 into the weights
        g = torch.where(count > 0, grad.to(torch.float64) / count.clamp(min=1), 0.0)
        A, B = coef[:, 0] * g, coef[:, 1] * g
        gam = torch.where(valid, coef[:, 3:] * g, torch.zeros_like(coef[:, 3:]))
        grad_h = 2 * A[:, None] * hq + B[:, None] * mean + (gam[:, :, None] * w_t).sum(1)
        ctx.stash.clear()
        ctx.stash.update(h_a=h_a, A=A, B=B, gamma=gam, target=target, valid=valid)
        return grad_h[:, :ctx.d].to(ctx.in_dtype), None, None, None, None, None, None, None, None, None, None


class FactoredSphericalLinear(torch.nn.Module):
    """A ``Linear(in_features, out_features)`` output layer trained with a spherical loss by exact, implicit SGD.

    ``forward(hidden, target)`` returns the mean loss over the rows with a target (``hidden (m, d)``, ``target
    (m,)`` class ids or ``(m, K)`` padded with ``ignore_index``, ``target_weight`` as in
    :mod:`fastloss.spherical`); ``hidden`` gets its exact gradient through autograd. After ``backward()``,
    ``sgd_step(lr, weight_decay)`` applies ``W ← W − lr·(∇W + weight_decay·W)``, ``bias ← bias − lr·∇bias``
    exactly, in O(m·d² + m·K·d). The weight and bias are not ``nn.Parameter`` s: do not hand this module to a
    torch optimizer (its SGD step is the method); ``weight``/``bias`` return the dense equivalents.

    ``loss`` ∈ {"zloss", "spherical_softmax", "taylor_softmax", "mse"} with the definitions of
    :func:`fastloss.linear_spherical_loss`. Stabilisation: U⁻¹ is recomputed exactly every
    ``reinvert_period`` steps; every ``stabilize_period`` steps U is folded into V (an O(out·d²) step) if its
    singular values have left [1/2, 2]; Q and w̄ are recomputed exactly every ``recompute_period`` steps
    (0 disables a mechanism). :meth:`consistency` reports the drifts.
    """

    def __init__(self, in_features: int, out_features: int, loss: str = "zloss", bias: bool = True, *,
                 a: float = 1.0, b: float = 0.0, eps: float = DEFAULT_EPS, ignore_index: int = -100,
                 reinvert_period: int = 10, stabilize_period: int = 100, recompute_period: int = 1000,
                 device=None, dtype=None):
        super().__init__()
        fn = "fastloss.FactoredSphericalLinear"
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{fn}: {name} must be a positive int, got {v!r}")
        if loss not in KINDS:
            raise ValueError(f"{fn}: loss must be one of {tuple(KINDS)}, got {loss!r}")
        for name, v in (("reinvert_period", reinvert_period), ("stabilize_period", stabilize_period),
                        ("recompute_period", recompute_period)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{fn}: {name} must be an int >= 0, got {v!r}")
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bool(bias)
        self.loss = loss
        self.a, self.b = V.check_zloss_args(fn, a, b)
        self.eps = V.check_finite(fn, "eps", eps, nonnegative=True)
        self.ignore_index = V.check_ignore_index(fn, ignore_index)
        self.reinvert_period, self.stabilize_period = reinvert_period, stabilize_period
        self.recompute_period = recompute_period
        dtype = dtype or torch.get_default_dtype()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's initialisation
        w = torch.empty(out_features, in_features + self.has_bias, device=device, dtype=dtype).uniform_(-bound, bound)
        self._set_dense(w)
        self._stash: dict = {}

    # ---------------------------------------------------------------------------------------------- state

    def _set_dense(self, w_a: torch.Tensor) -> None:
        """(Re)factorise from the dense augmented weight: V = W_a, U = I, c = 0, exact Q and w̄."""
        da = w_a.shape[1]
        f64 = dict(device=w_a.device, dtype=torch.float64)
        for name, value in (("V", w_a.detach().clone()), ("U", torch.eye(da, **f64)),
                            ("U_inv", torch.eye(da, **f64)), ("c", torch.zeros(da, **f64))):
            if name in self._buffers:
                self._buffers[name] = value
            else:
                self.register_buffer(name, value)
        self._recompute_stats()
        if "steps" not in self._buffers:
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=w_a.device))

    def _dense_augmented(self) -> torch.Tensor:
        return self.V.to(torch.float64) @ self.U + self.c

    def _recompute_stats(self) -> None:
        w_a = self._dense_augmented()
        gram, col_sum = w_a.t() @ w_a, w_a.sum(0)
        for name, value in (("gram", gram), ("col_sum", col_sum)):
            if name in self._buffers:
                self._buffers[name] = value
            else:
                self.register_buffer(name, value)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight this layer represents."""
        return self._dense_augmented()[:, :self.in_features].to(self.V.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._dense_augmented()[:, self.in_features].to(self.V.dtype) if self.has_bias else None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, loss: str = "zloss", **kwargs):
        """A factored layer equal to the dense ``weight (out, in)`` and optional ``bias (out,)``."""
        out, d = weight.shape
        layer = cls(d, out, loss=loss, bias=bias is not None, device=weight.device, dtype=weight.dtype, **kwargs)
        w_a = torch.cat([weight, bias[:, None].to(weight.dtype)], 1) if bias is not None else weight
        layer._set_dense(w_a)
        return layer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Dense logits ``hidden @ weight.T + bias`` (for inference and top-k), O(m·out·d)."""
        h = hidden.to(torch.float64)
        if self.has_bias:
            h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)
        return ((h @ self.U.t()) @ self.V.to(torch.float64).t() + (h @ self.c)[..., None]).to(self.V.dtype)

    def consistency(self) -> dict[str, float]:
        """Relative drifts of the kept statistics from their exact values (O(out·d²)): ``gram``
        ‖Q − W_aᵀW_a‖/‖W_aᵀW_a‖, ``col_sum`` ‖w̄ − W_aᵀ1‖/‖W_aᵀ1‖ and ``inverse`` ‖U·U⁻¹ − I‖."""
        w_a = self._dense_augmented()
        gram, col_sum = w_a.t() @ w_a, w_a.sum(0)
        eye = torch.eye(self.U.shape[0], dtype=torch.float64, device=self.U.device)
        rel = lambda x, y: (torch.linalg.norm(x - y) / torch.linalg.norm(y).clamp_min(1e-300)).item()  # noqa: E731
        return {"gram": rel(self.gram, gram), "col_sum": rel(self.col_sum, col_sum),
                "inverse": torch.linalg.norm(self.U @ self.U_inv - eye).item()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                f"loss={self.loss!r}")

    # ------------------------------------------------------------------------------------ forward, step

    def forward(self, hidden: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor | None = None):
        fn = "fastloss.FactoredSphericalLinear"
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
            raise ValueError(f"{fn}: hidden must be a (batch, {self.in_features}) tensor, got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
        if hidden.shape[1] != self.in_features:
            raise ValueError(f"{fn}: hidden has width {hidden.shape[1]}, the layer expects {self.in_features}")
        if not hidden.dtype.is_floating_point or hidden.device != self.V.device:
            raise TypeError(f"{fn}: hidden must be a floating tensor on {self.V.device}")
        if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
            raise TypeError(f"{fn}: target must be an integer tensor of class ids")
        if target.dim() not in (1, 2) or target.shape[0] != hidden.shape[0]:
            raise ValueError(f"{fn}: target must be ({hidden.shape[0]},) or ({hidden.shape[0]}, K), "
                             f"got {tuple(target.shape)}")
        if target.device != hidden.device:
            raise ValueError(f"{fn}: target is on {target.device} but hidden is on {hidden.device}")
        t = target.reshape(hidden.shape[0], -1).long()
        if hidden.device.type == "cpu" or V.get_validation():  # on CUDA a sync: behind the validation switch
            V.check_target_range(fn, t, self.out_features, self.ignore_index)
        tw = None
        if target_weight is not None:
            if target_weight.shape != target.shape:
                raise ValueError(f"{fn}: target_weight must have the shape of target {tuple(target.shape)}")
            V.check_no_grad(fn, "target_weight", target_weight)
            tw = target_weight.reshape(t.shape).to(torch.float64)
        if not _ops.use_kernel("spherical_row_terms", hidden.device):
            raise RuntimeError(f"{fn}: needs the compiled extension (fastloss._C) on {hidden.device}")
        opts = (KINDS[self.loss], self.a, self.b, self.eps, self.ignore_index, self.has_bias)
        # a graph even for hidden that needs no gradient: backward() is what hands the step its coefficients
        anchor = None
        if torch.is_grad_enabled() and not hidden.requires_grad:
            anchor = hidden.new_zeros((), requires_grad=True)
        return _FactoredLoss.apply(hidden, self.V, self.U, self.c, self.gram, self.col_sum, t, tw, opts,
                                   self._stash, anchor)

    @torch.no_grad()
    def sgd_step(self, lr: float, weight_decay: float = 0.0) -> None:
        """Exact SGD on the dense weight and bias with the gradient of the last ``backward()``:
        ``W ← W − lr·(∇W + weight_decay·W)``, ``bias ← bias − lr·∇bias`` (no decay on the bias)."""
        fn = "fastloss.FactoredSphericalLinear.sgd_step"
        lr = V.check_finite(fn, "lr", lr, positive=True)
        weight_decay = V.check_finite(fn, "weight_decay", weight_decay, nonnegative=True)
        if lr * weight_decay >= 1:
            raise ValueError(f"{fn}: lr * weight_decay must be < 1, got {lr * weight_decay}")
        if not self._stash:
            raise RuntimeError(f"{fn}: no gradient: call forward() and backward() first")
        s = self._stash
        h_a, A, B, gam, target, valid = s["h_a"], s["A"], s["B"], s["gamma"], s["target"], s["valid"]
        self._stash = {}
        out, da = self.V.shape
        P, lr2a = h_a, 2 * lr * A  # G = P' diag(A) P has rank <= m: every product below is O(m d^2)
        decay = torch.full((da,), 1 - lr * weight_decay, dtype=torch.float64, device=h_a.device)
        if self.has_bias:
            decay[-1] = 1.0

        def times_M(X):  # X @ M for a block of rows, M = diag(decay) - 2 lr G (symmetric)
            return X * decay - ((X @ P.t()) * lr2a) @ P

        mean = self.col_sum / out
        r = P.t() @ B / out - 2 * (P.t() @ (A * (P @ mean)))  # H'B / V - 2 G m
        # target rows: S_k = sum of gamma_nj h_a[n] over the (n, j) with c_nj = k, one row per distinct class k.
        # Distinct classes by sorting into m K segments (unused segments stay zero rows of class 0): no
        # data-dependent shape, so no host sync.
        K = target.shape[1]
        cls, order = torch.sort(torch.where(valid, target, torch.zeros_like(target)).reshape(-1), stable=True)
        seg = torch.cumsum(torch.cat([cls.new_zeros(1), (cls[1:] != cls[:-1]).long()]), 0)
        uniq = torch.zeros_like(cls).scatter_(0, seg, cls)
        rows = (gam.reshape(-1, 1) * h_a.repeat_interleave(K, 0))[order]  # invalid targets carry gamma = 0
        S = torch.zeros(cls.shape[0], da, dtype=torch.float64, device=h_a.device).index_put_((seg,), rows,
                                                                                             accumulate=True)
        Z = times_M(self.V[uniq].to(torch.float64) @ self.U + self.c) - lr * r  # those rows of W_a M - lr 1 r'
        # exact rank-m updates of Q = W_a'W_a and w̄ = W_a'1 for W_a <- W_a M - lr 1 r' - lr S
        Mw = times_M(self.col_sum[None])[0]
        MQM = times_M(times_M(self.gram).t()).t()
        gram = MQM - lr * (torch.outer(Mw, r) + torch.outer(r, Mw) + Z.t() @ S + S.t() @ Z)
        gram = gram + lr * lr * (out * torch.outer(r, r) + S.t() @ S)
        self.gram = 0.5 * (gram + gram.t())
        self.col_sum = Mw - lr * out * r - lr * S.sum(0)
        # U <- U M, c <- M'c - lr r, U^-1 <- M^-1 U^-1 by Woodbury: M = D - P'Y with Y = 2 lr diag(A) P
        self.U = times_M(self.U)
        self.c = times_M(self.c[None])[0] - lr * r
        dinv = 1.0 / decay
        Yd = (lr2a[:, None] * P) * dinv
        core = torch.eye(P.shape[0], dtype=torch.float64, device=P.device) - Yd @ P.t()
        self.U_inv = dinv[:, None] * self.U_inv + (dinv[:, None] * P.t()) @ torch.linalg.solve(core, Yd @ self.U_inv)
        # V[k] <- V[k] - lr S_k U^-1 on the target rows only
        self.V.index_put_((uniq,), (-lr * S @ self.U_inv).to(self.V.dtype), accumulate=True)
        self.steps += 1
        self._stabilize(int(self.steps))

    def _stabilize(self, step: int) -> None:
        if self.reinvert_period and step % self.reinvert_period == 0:
            self.U_inv = torch.linalg.inv(self.U)
        if self.stabilize_period and step % self.stabilize_period == 0:
            sv = torch.linalg.svdvals(self.U)
            if sv.min() < 0.5 or sv.max() > 2.0:  # fold U (and c) into V: W_a unchanged, U = I
                self._set_dense(self._dense_augmented().to(self.V.dtype))
                return
        if self.recompute_period and step % self.recompute_period == 0:
            self._recompute_stats()
