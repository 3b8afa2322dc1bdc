"""Optimizer transforms.

:class:`OrthoGrad` is the ⊥Grad wrapper of Prieto et al. (2025), "Grokking at the Edge of Numerical Stability".
"""

from __future__ import annotations

import torch

__all__ = ["OrthoGrad"]

_EPS = 1e-30  # the released code's guard for a zero parameter or a gradient parallel to it


class OrthoGrad(torch.optim.Optimizer):
    """⊥Grad: before each step of ``base_optimizer``, every parameter tensor's gradient ``g`` (flattened) is
    replaced by its component orthogonal to the parameter ``θ``,
    ``g⊥ = g − (θ·g / θ·θ) θ``, rescaled to the norm of ``g`` (``g⊥ · ‖g‖ / ‖g⊥‖``), as the authors' released
    wrapper does. This removes the "naive loss minimisation" direction that only scales the weights.

        opt = fastloss.optim.OrthoGrad(model.parameters(), base_optimizer=torch.optim.AdamW, lr=1e-3)

    ``base_kwargs`` go to ``base_optimizer``, which shares this optimizer's parameter groups (so learning-rate
    schedulers may wrap either). ``state_dict()`` / ``load_state_dict()`` are the base optimizer's. The
    projection is computed in float32 (float64 for float64 parameters) and written back into ``.grad``.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, **base_kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "fastloss.optim.OrthoGrad: base_optimizer must be a torch.optim.Optimizer subclass (the class, "
                f"not an instance), got {base_optimizer!r}"
            )
        super().__init__(params, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One set of groups and one state: what the base optimizer reads is what schedulers and users see.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state

    @staticmethod
    @torch.no_grad()
    def project_(param: torch.Tensor) -> None:
        """Replace ``param.grad`` by its norm-preserving orthogonal component (in place)."""
        g0 = param.grad
        if g0 is None:
            return
        if g0.is_sparse:
            raise RuntimeError("fastloss.optim.OrthoGrad does not support sparse gradients")
        acc = torch.float64 if param.dtype == torch.float64 else torch.float32
        w = param.detach().reshape(-1).to(acc)
        g = g0.reshape(-1).to(acc)
        coef = torch.dot(w, g) / (torch.dot(w, w) + _EPS)
        g_orth = g - coef * w
        g_orth = g_orth * (torch.linalg.vector_norm(g) / (torch.linalg.vector_norm(g_orth) + _EPS))
        g0.copy_(g_orth.view_as(g0))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                self.project_(p)
        self.base_optimizer.step()
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group) -> None:
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        return f"OrthoGrad({self.base_optimizer!r})"
