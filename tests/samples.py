"""One sample generator shared by the correctness, opcheck, gradcheck and compile tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# (rtol, atol) when comparing with an exact peer in the same dtype.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class RowSample:
    name: str
    logits: torch.Tensor  # (..., C), may be a strided view
    target: torch.Tensor  # (...)
    kwargs: dict = field(default_factory=dict)

    def fresh(self, requires_grad: bool = True):
        """Independent leaf copies that keep the sample's strides."""
        x = self.logits.detach().clone() if self.logits.is_contiguous() else _strided_copy(self.logits)
        return x.requires_grad_(requires_grad), self.target.clone()


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def _targets(n, C, gen, device, ignore_index=-100, frac_ignored=0.2):
    t = torch.randint(0, C, (n,), generator=gen).to(device)
    if n > 2 and frac_ignored:
        t[torch.rand(n, generator=gen).to(device) < frac_ignored] = ignore_index
        t[0] = 0 if C > 0 else t[0]
    return t


def row_samples(device: str, dtype: torch.dtype, *, big: bool = False) -> list[RowSample]:
    """Odd shapes and layouts for the row-loss ops: C=1, C=3, C not a multiple of any vector width,
    (B, T, C), N=0, strided rows, a class-strided (transposed) view and, with big=True, C > 65536."""
    gen = torch.Generator().manual_seed(1234)

    def randn(*shape, scale=3.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    out = [
        RowSample("C1", randn(5, 1), _targets(5, 1, gen, device)),
        RowSample("C3", randn(9, 3), _targets(9, 3, gen, device)),
        RowSample("C1001", randn(13, 1001), _targets(13, 1001, gen, device)),
        RowSample("BTC", randn(2, 5, 37), _targets(10, 37, gen, device).reshape(2, 5)),
        RowSample("N0", randn(0, 7), torch.zeros(0, dtype=torch.long, device=device)),
        # empty and class-strided: .contiguous() keeps an empty tensor's strides, the ops must take it anyway
        RowSample("N0_class_strided", randn(0, 14)[:, ::2], torch.zeros(0, dtype=torch.long, device=device)),
        RowSample("row_strided", randn(11, 530)[:, 3:520], _targets(11, 517, gen, device)),
        RowSample("class_strided", randn(40, 6).t(), _targets(6, 40, gen, device)),
    ]
    if big:
        out.append(RowSample("C70001", randn(3, 70001), _targets(3, 70001, gen, device, frac_ignored=0)))
    return out


def materialise_options(opts: dict, C: int, device, dtype) -> dict:
    """Loss options with "weight": "rand" replaced by a fixed random class-weight vector (C,) in [0.1, 1.1)."""
    opts = dict(opts)
    if opts.get("weight") == "rand":
        gen = torch.Generator().manual_seed(7)
        opts["weight"] = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)
    return opts


def grad_like(loss: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An upstream gradient that is not 1 (random for reduction='none', 1.7 for scalars)."""
    if loss.dim() == 0:
        return torch.full_like(loss, 1.7)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss) + 0.5


def loss_and_grad(fn, sample: RowSample, **kwargs):
    x, t = sample.fresh()
    out = fn(x, t, **{**sample.kwargs, **kwargs})
    loss = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(loss, x, grad_like(loss), allow_unused=False) if x.numel() else (torch.zeros_like(x),)
    return loss.detach(), g


class TinyHead(torch.nn.Module):
    """A linear head feeding `loss(logits, target)`: the model that compile tests trace end to end."""

    def __init__(self, d, C, loss):
        super().__init__()
        self.proj = torch.nn.Linear(d, C)
        self.loss = loss

    def forward(self, h, t):
        return self.loss(torch.tanh(self.proj(h)) * 4, t)


def check_compile_fullgraph(loss, device):
    """torch.compile(fullgraph=True) of a TinyHead with `loss` gives the eager loss and parameter gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyHead(16, 53, loss).to(device)
    h = torch.randn(4, 6, 16, device=device)
    t = torch.randint(0, 53, (4, 6), device=device)
    t[0, 0] = -100
    eager = model(h, t)
    eager.backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(h, t)
    out.backward()
    torch.testing.assert_close(out, eager)
    for g, ge in zip([p.grad for p in model.parameters()], g_eager, strict=True):
        torch.testing.assert_close(g, ge)


def streamed_rows(device: str, dtype: torch.dtype, rows_div: int = 1) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, logits, target) of 16-byte-aligned rows for the CUDA staged forwards (csrc/cuda/common.cuh,
    stream_rows_staged), enough of them that every block of the persistent grid streams at least 3 rows through
    its shared-memory ring on an H200 (132 SMs, 1024 threads each: 2112 blocks of 64 threads, 1056 of 128): one
    partial group per row, a 5-element tail past the last whole pack, three groups per thread with the last
    partial (bf16: 128 threads), rows starting 16 bytes into a wider row, and one long row whose tail is the
    only one a staged backward sees (with N > 1 a row of C % 8 != 0 2-byte logits leaves the gradient's rows
    misaligned, and the backward runs unstaged). A tenth of the targets are ignored (-100); the first and last
    class are targets of rows 0 and 1 (of row 0 in the single row). rows_div divides the row counts (the CUDA
    emulator of tests/cuemu, with its one SM, needs 1/64 of them for as many rows per block)."""
    gen = torch.Generator().manual_seed(21)
    out = []
    # (rows, row width, first and past-last class, scale: the squared error of a row stays within fp16's range)
    for name, (N, width, lo, hi, scale) in {
        "one_group_per_row": (6400, 264, 0, 264, 2.0),
        "tail": (6400, 520, 0, 517, 2.0),
        "partial_last_group": (3200, 9000, 0, 9000, 2.0),
        "aligned_slice": (6400, 1032, 8, 1032, 2.0),
        "single_row_tail": (1, 70005, 0, 70005, 0.5),
    }.items():
        N = max(1, N // rows_div)
        full = (torch.randn(N, width, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        C = hi - lo
        t = torch.randint(0, C, (N,), generator=gen)
        t[torch.rand(N, generator=gen) < 0.1] = -100
        t[0], t[-1] = 0, C - 1
        out.append((name, full[:, lo:hi], t.to(device)))
    return out


def streamed_losses(dtype: torch.dtype, device: str = "cuda", rows_div: int = 1,
                    bad_row: bool = True) -> dict[str, torch.Tensor]:
    """Per-row losses and logit gradients of every streamed_rows case on CUDA, for a bitwise comparison of the
    staged kernels with their unstaged twins (tests/test_cross_entropy.py runs this in a subprocess with
    FASTLOSS_ROW_STAGED=0): the spherical family, and cross-entropy plain (staged light forward), with a scale
    and an lse penalty (the backward's lse term) and with softcap, smoothing and class weights (general forward,
    staged backward), Z-loss with two weighted targets per row; a bad target in row 7 (NaN row) unless not
    bad_row. device="cpu" with rows_div=64: the same through the CUDA emulator (tests/cuemu)."""
    import fastloss

    out = {}
    for case, x, t in streamed_rows(device, dtype, rows_div):
        C = x.shape[-1]
        gen = torch.Generator().manual_seed(3)
        w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.1).to(device=device, dtype=torch.float32)
        calls = {
            "cross_entropy": lambda x, t: fastloss.cross_entropy(x, t, reduction="none"),
            "ce_scaled_lse": lambda x, t: fastloss.cross_entropy(x, t, reduction="none", logit_scale=0.37,
                                                                 lse_square_scale=1e-3),
            "ce_softcap_smooth_weight": lambda x, t, w=w: fastloss.cross_entropy(x, t, reduction="none", softcap=5.0,
                                                                                 label_smoothing=0.1, weight=w),
            **{name: lambda x, t, name=name: getattr(fastloss, name)(x, t, reduction="none") for name in (
                "zloss", "spherical_softmax_loss", "taylor_softmax_loss", "spherical_mse_loss")},
            # two weighted targets per row (the second repeats the first in some rows): the backward's fix-ups
            "zloss_two_targets": lambda x, t: fastloss.zloss(
                x, torch.stack([t, t.roll(1)], -1), reduction="none",
                target_weight=torch.linspace(0.5, 2.0, 2 * t.numel(), device=device).reshape(-1, 2)),
        }
        if bad_row and t.numel() > 7:
            t = t.clone()
            t[7] = C
        for name, call in calls.items():
            xi = x.detach().requires_grad_()  # the view itself: the offset slice keeps its row stride
            loss = call(xi, t)
            (g,) = torch.autograd.grad(loss, xi, torch.ones_like(loss))
            out[f"{case}/{name}/loss"], out[f"{case}/{name}/grad"] = loss.detach().cpu(), g.cpu()
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bits as bytes, for bitwise comparisons in which NaNs compare too. Copied into fresh strides first: a
    tensor with a size-1 dimension counts as contiguous whatever that dimension's stride (a (1,) column of a
    (1, 3) tensor has stride 3), and view(torch.uint8) needs stride 1."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t).reshape(-1).view(torch.uint8)
