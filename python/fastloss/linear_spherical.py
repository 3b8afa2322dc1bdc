"""The spherical family from hidden states, without logits: the Gram form (research/spherical.md section 5).

For logits ``o = W h + b`` over V classes, a spherical loss needs per row only the mean ``μ = (w̄·h + Σb)/V``, the
centred square sum ``m2 = Σ_k (o_k − μ)² = hᵀQ_c h + 2 hᵀu + β`` and the target outputs, where
``Q_c = W_cᵀW_c``, ``u = W_cᵀb_c``, ``β = ‖b_c‖²`` come from the centred weight ``W_c = W − 1mᵀ`` (m = w̄/V) and
bias ``b_c``. So a step costs about ``V·d²`` (the Gram, once) plus ``N·d²`` instead of ``N·V·d``, and no ``N × V``
tensor exists. The exact gradients, with ``A = ∂L/∂m2``, ``B = ∂L/∂μ`` and ``γ_j = ∂L/∂o_{c_j}`` per row, are

    ∇h_n = 2A_n (Q_c h_n + u) + B_n m + Σ_j γ_nj w_{c_nj}
    ∇W   = 2 W_c G + 2 b_c vᵀ + 1 (HᵀB / V)ᵀ + Σ_nj γ_nj e_{c_nj} h_nᵀ,     G = Hᵀ diag(A) H,  v = HᵀA
    ∇b   = 2 (W_c v + b_c ΣA) + ΣB / V + Σ_nj γ_nj e_{c_nj}

Centring the Gram keeps the Z-loss variance exact when the output embeddings share a large mean direction
(``q/V − μ²`` would cancel). Statistics and products run in float32 (float64 for float64 inputs), TF32 off
unless asked for. bfloat16 inputs on CUDA keep tensor-core speed with fp32 accuracy (``bf16_split``): every product
takes bf16 operands with fp32 accumulation, and an fp32 operand (the centred weight, the d×d statistics) is split
into bf16 ``hi + lo`` parts (about 16 mantissa bits), so it costs two bf16 GEMMs instead of one fp32 GEMM.
With a ``process_group`` the weight is sharded by rows (vocab parallel): each rank centres
its shard on its own (rounded) mean, and one all-reduce carries the shard Grams, the shard sums, their residual
sums ``r_s = Σ_{k∈s} (w_k − m_s)`` and the target outputs; the exact pooled Gram follows from the
parallel-variance identity ``Q_c = Σ_s Q_s + Σ_s V_s (m_s − m)(m_s − m)ᵀ`` with the cross terms
``(m_s − m) r_sᵀ + r_s (m_s − m)ᵀ`` that a rounded shard mean leaves. The backward all-reduces the target part of ∇h.
"""

from __future__ import annotations

import contextlib

import torch

from . import _ops
from . import _validation as V
from ._autograd import first_order
from ._reduce import reduce_rows
from .spherical import DEFAULT_EPS, KINDS

_CHUNK_ROWS = 8192  # rows of W centred and multiplied at a time (bounds the temporary to 8192 x d)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _exact_products(device: torch.device, allow_tf32: bool):
    """The products in the precision _Products chose: no autocast (it would turn the fp32 statistics' matmuls
    into bf16 ones) and no TF32 unless asked for."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda" or allow_tf32 or torch.compiler.is_compiling():
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old


def _split(x: torch.Tensor, col_shift: torch.Tensor | None = None, row_scale: torch.Tensor | None = None):
    """v = (x - col_shift) * row_scale in fp32 as bf16 (hi, lo): hi = bf16(v), lo = bf16(v - hi), so that
    |v - hi - lo| <= 2^-16 |v|. One fused pass (spherical_split_bf16): reads x once, writes the two halves."""
    return torch.ops.fastloss.spherical_split_bf16(x, col_shift, row_scale)


def _mm32(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """add + a @ b for bf16 a, b with fp32 accumulation and output (bf16 tensor cores on CUDA); ``add`` is a full
    fp32 matrix, typically ``out`` itself (accumulate in place). The CPU has no such GEMM and emulates it exactly
    (bf16 products are exact in fp32), so the CPU tests run the same maths."""
    if a.device.type == "cuda":
        if add is None:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        return torch.addmm(add, a, b, out_dtype=torch.float32, out=out)
    a, b = a.float(), b.float()
    return torch.mm(a, b, out=out) if add is None else torch.addmm(add, a, b, out=out)


class _Products:
    """The matrix products of the Gram form in one of two precisions. ``split``: bf16 inputs stay bf16 and fp32
    operands are split (`_split`), two bf16 GEMMs per product, fp32 accumulation. Otherwise: operands upcast to
    the accumulation dtype (fp32; fp64 for fp64 inputs). ``centred``: how `centred_gram` forms the weight's Gram
    (centred rows; or the raw Gram, one product fewer with the split, centred afterwards)."""

    def __init__(self, split: bool, acc: torch.dtype, centred: bool = True):
        self.split, self.acc, self.centred = split, acc, centred

    def row_step(self, x: torch.Tensor, copies: bool = False) -> int:
        """Rows of x per product. A product that copies its chunk of x (centred, upcast, split, or the CPU's
        emulated bf16 GEMM) takes _CHUNK_ROWS at a time, which bounds the temporary; one that reads x in place
        takes it whole: one launch, and no partly filled last wave of GEMM tiles per chunk."""
        in_place = not copies and (x.is_cuda if self.split else x.dtype == self.acc)
        return max(x.shape[0], 1) if in_place else _CHUNK_ROWS

    def operand(self, y: torch.Tensor, coarse: bool = False):
        """y (k, p) in the accumulation dtype, prepared once for several `times` calls: split into (hi, lo), or
        ``coarse``: rounded to bf16 once, (hi,)."""
        if coarse:
            return (y.to(torch.bfloat16),)
        return _split(y) if self.split else y

    def times(self, x: torch.Tensor, y, add: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """add + x @ y for an input operand x (n, k) and an accumulation-dtype y (k, p) or its `operand`, into
        ``out`` if given; ``add`` may broadcast (a row) without the split, and is a full matrix with it."""
        if not self.split:
            x = x.to(self.acc)
            return torch.mm(x, y, out=out) if add is None else torch.addmm(add, x, y, out=out)
        parts = y if isinstance(y, tuple) else _split(y)
        for p in reversed(parts):  # lo first, then hi onto it
            out = add = _mm32(x, p, add, out=out)
        return out

    def col_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_rows x for an input operand x (n, d), as a GEMV (a dim-0 reduction is several times slower)."""
        ones = x.new_ones((x.shape[0], 1), dtype=x.dtype if self.split else self.acc)
        return (_mm32(x.t(), ones) if self.split else x.to(self.acc).t() @ ones)[:, 0]

    def centred_gram(self, x: torch.Tensor, shift: torch.Tensor,
                     cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x - shift)ᵀ (x - shift) for an input operand x (n, d) and its rounded mean ``shift``, in row chunks
        accumulated in place (no d x d temporary per chunk): with the split, each chunk's centred rows are split
        in one pass, and the Gram is Σ hiᵀhi + C + Cᵀ with C = Σ hiᵀlo (the lo·lo term is below the split's own
        error). Not ``centred``: xᵀx - n·shift shiftᵀ, where the bf16 x needs no split (one GEMM, not two), but
        the subtraction cancels: the error grows with (μ² + σ²) / σ² of the outputs (μ their row mean).
        With the fp32 / fp64 products, also (x - shift)ᵀ [1, cols] (d, 1 + k) from the same exactly centred
        rows (None elsewhere): the residual sum Σ (x - shift), what the rounded mean misses (its last bit,
        times μ/σ, is the precision of the target outputs and the hidden gradient beside a large shared mean),
        and the products with ``cols`` (n, k) (the centred bias: Wᵀb_c - m Σ b_c would cancel)."""
        d = x.shape[1]
        gram = shift.new_zeros((d, d), dtype=self.acc)
        if not self.centred:
            step = self.row_step(x)
            for r0 in range(0, x.shape[0], step):
                xc = x[r0:r0 + step]
                if self.split:
                    _mm32(xc.t(), xc, gram, out=gram)
                else:
                    xc = xc.to(self.acc)
                    gram.addmm_(xc.t(), xc)
            return gram.addr_(shift, shift, alpha=-x.shape[0]), None
        cross = gram.clone() if self.split else None
        side = None if self.split else shift.new_zeros((d, 1 + (cols.shape[1] if cols is not None else 0)),
                                                       dtype=self.acc)
        buf = None if self.split else x.new_empty((min(_CHUNK_ROWS, x.shape[0]), d), dtype=self.acc)
        for r0 in range(0, x.shape[0], _CHUNK_ROWS):
            if not self.split:
                xc = x[r0:r0 + _CHUNK_ROWS]
                xc = torch.sub(xc, shift, out=buf[:xc.shape[0]])  # one chunk buffer for all chunks
                gram.addmm_(xc.t(), xc)
                ones = xc.new_ones((xc.shape[0], 1))  # Σ as a GEMV (a dim-0 sum is slower)
                side.addmm_(xc.t(), ones if cols is None else torch.cat([ones, cols[r0:r0 + _CHUNK_ROWS]], 1))
                continue
            hi, lo = _split(x[r0:r0 + _CHUNK_ROWS], shift.float())
            _mm32(hi.t(), hi, gram, out=gram)
            _mm32(hi.t(), lo, cross, out=cross)
        if self.split:
            return gram + (cross + cross.t()), None
        return gram, side

    def weighted_gram(self, x: torch.Tensor, w: torch.Tensor, coarse: bool = False) -> torch.Tensor:
        """xᵀ diag(w) x for an input operand x (N, d) and accumulation-dtype w (N,), in row chunks; ``coarse``
        (split only): w ⊙ x rounded to bf16 once, one GEMM instead of two."""
        d = x.shape[1]
        out = w.new_zeros((d, d))
        for r0 in range(0, x.shape[0], _CHUNK_ROWS):
            xc, wc = x[r0:r0 + _CHUNK_ROWS], w[r0:r0 + _CHUNK_ROWS]
            if not self.split:
                xf = xc.to(self.acc)
                out.addmm_((xf * wc[:, None]).t(), xf)
                continue
            hi, lo = _split(xc, None, wc.float())
            out = _mm32(hi.t(), xc, out, out=out)
            if not coarse:
                out = _mm32(lo.t(), xc, out, out=out)
        return out


def _shard_stats(weight, bias, prod):
    """Of one shard of rows: its rounded means (m, bm) and, about them, the Gram, u = W_cᵀ b_c, β = ‖b_c‖² and the
    residual sums Σ (w - m), Σ (b - bm) (d + 1: what the rounded means miss); and whether the weight's residual
    is known (the fp32 / fp64 centred products; else its part is 0, see `_Products.centred_gram`)."""
    acc = prod.acc
    Vs, d = weight.shape
    wsum = weight.new_zeros((d,), dtype=acc)
    step = prod.row_step(weight)
    for r0 in range(0, Vs, step):
        wsum += prod.col_sums(weight[r0:r0 + step])
    m = wsum / Vs
    bm = bias.sum(dtype=acc) / Vs if bias is not None else wsum.new_zeros(())
    bc = bias.to(acc) - bm if bias is not None else None
    gram, side = prod.centred_gram(weight, m, bc[:, None] if bc is not None else None)
    u = side[:, 1] if side is not None and bc is not None else weight.new_zeros((d,), dtype=acc)
    if bc is not None and side is None:  # u = Wᵀ b_c - m Σ b_c (cancels like the raw Gram for a large mean)
        for r0 in range(0, Vs, step):
            bcc = bc[r0:r0 + step]
            u += prod.times(weight[r0:r0 + step].t(), bcc[:, None])[:, 0] - m * bcc.sum()
    beta = bc.square().sum() if bc is not None else wsum.new_zeros(())
    bres = bc.sum() if bc is not None else wsum.new_zeros(())
    wres = side[:, 0] if side is not None else wsum.new_zeros((d,))
    return m, bm, gram, u, beta, torch.cat([wres, bres.reshape(1)]), side is not None


class _LinearSpherical(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, target_weight, kind, a, b, eps, ignore_index, group,
                allow_tf32, split, centred=True, coarse_wgrad=False):
        acc = _acc(hidden)
        prod = _Products(split, acc, centred)
        Vs = weight.shape[0]
        world, rank = (1, 0) if group is None else (torch.distributed.get_world_size(group),
                                                   torch.distributed.get_rank(group))
        with _exact_products(hidden.device, allow_tf32):
            m_s, bm_s, gram, u, beta, rsum, exact_mean = _shard_stats(weight, bias, prod)
            counts = [Vs]
            if group is not None:  # shard boundaries as host ints: the one host sync of vocab-parallel mode
                c = torch.zeros(world, dtype=torch.int64, device=hidden.device)
                c[rank] = Vs
                torch.distributed.all_reduce(c, group=group)
                counts = c.tolist()
            offsets = [sum(counts[:r]) for r in range(world)]
            Vtot, lo = sum(counts), offsets[rank]
            valid = target != ignore_index
            local = valid & (target >= lo) & (target < lo + Vs)
            safe = torch.where(local, target - lo, torch.zeros_like(target))
            center = torch.cat([m_s, bm_s.reshape(1)])  # shard-centred target outputs, and raw ones
            dots = torch.ops.fastloss.spherical_gather_dot(hidden, weight, bias, target, center, lo, ignore_index)
            d = weight.shape[1]
            if group is not None:  # one all-reduce: [gram | u | beta | per-rank (m, bm, rsum) slots | targets]
                slots = m_s.new_zeros((world, 2 * d + 2))
                slots[rank] = torch.cat([center, rsum])
                buf = torch.cat([gram.reshape(-1), u, beta.reshape(1), slots.reshape(-1), dots.reshape(-1)])
                torch.distributed.all_reduce(buf, group=group)
                sizes = [d * d, d, 1, world * (2 * d + 2), dots.numel()]
                gram, u, beta, slots, dots = buf.split(sizes)
                gram, beta = gram.reshape(d, d), beta.reshape(())
                slots, dots = slots.reshape(world, 2 * d + 2), dots.reshape(*target.shape, 2)
            else:
                slots = torch.cat([center, rsum])[None]
            # per shard: the rounded means (m_s, bm_s) its statistics are about, exactly as it used them, and its
            # residual sums about them
            slots, rsums = slots[:, :d + 1], slots[:, d + 1:]
            dev, oc = dots[..., 0], dots[..., 1]
            rsum, mean = rsums.sum(0), slots[0]  # global (m, bm)
            if world > 1:  # parallel-variance identity (exact for any global reference mean): pooled statistics
                cnt = torch.tensor(counts, dtype=acc, device=hidden.device)
                mean = (slots * cnt[:, None]).sum(0) / Vtot
                diff = slots - mean  # per-shard (m_s - m, bm_s - bm)
                dw, db, rw, rb = diff[:, :d], diff[:, d], rsums[:, :d], rsums[:, d]
                # with the cross terms of each shard's residual sums: its statistics are about its rounded means
                cross = dw.t() @ rw
                gram = gram + (dw * cnt[:, None]).t() @ dw + cross + cross.t()
                u = u + (dw * cnt[:, None]).t() @ db + rw.t() @ db + dw.t() @ rb
                beta = beta + (cnt * db.square()).sum() + 2 * (db * rb).sum()
                rsum = rsum + (diff * cnt[:, None]).sum(0)  # the shard means' offsets from the global ones
                # shard-centred target outputs -> globally centred: + (m_s - m) . h + (bm_s - bm) of the owner
                starts = torch.tensor(offsets, device=hidden.device)
                owner = torch.searchsorted(starts, target.clamp(min=0), right=True) - 1
                corr = prod.times(hidden, diff[:, :d].t()) + diff[:, d]  # (N, world)
                dev = torch.where(valid, dev + corr.gather(1, owner.clamp(0, world - 1)), dev)
            m, bm = mean[:d], mean[d]
            stat = torch.cat([m, bm.reshape(1), u, beta.reshape(1)])
            hq = prod.times(hidden, gram)  # kept for the backward (N x d, the size of hidden's own gradient)
            # [h·m, m2]: h·m (in double) apart from the bias mean, so that it stays exact to its own size
            row = torch.ops.fastloss.spherical_row_stats(hidden, hq, torch.cat([m, m.new_zeros(1), stat[d + 1:]]))
            # the rounded means' last bits (exact mean - rounded): mu and o_c - mu about the exact means
            delta = rsum / Vtot
            h_delta = prod.times(hidden, delta[:d, None])[:, 0] if exact_mean else delta.new_zeros(())
            hm = row[:, 0] + h_delta  # h · (exact weight mean)
            dev = torch.where(valid, dev - (h_delta + delta[d]).reshape(-1, 1), dev)
            delta = (delta[:d] if exact_mean else None, delta[d])  # for the hidden gradient, the centred bias
            bad = (valid & ((target < 0) | (target >= Vtot))).any(-1)  # out-of-range target: NaN row, no sync
            # NaN into every statistic a loss may read (the Z-loss reads m2 and o_c - mu, not mu or o_c)
            mu = torch.where(bad, torch.nan, hm + (bm + delta[1]))
            m2 = torch.where(bad, torch.nan, row[:, 1])
            oc = torch.where(bad[:, None], torch.nan, oc)
        rows, coef = torch.ops.fastloss.spherical_row_terms(mu, m2, oc, dev, target, target_weight, kind, a, b, eps,
                                                            Vtot, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, target, hq, gram, stat, coef, local, safe, hm)
        ctx.opts = (group, rank, lo, ignore_index, allow_tf32, Vtot, bias is not None, split, split and coarse_wgrad)
        ctx.delta, ctx.delta_b = delta
        ctx.mark_non_differentiable(coef)
        return rows, coef

    @staticmethod
    @first_order  # first-order only: differentiating the result raises (fastloss._autograd)
    def backward(ctx, grad_rows, _grad_coef):
        hidden, weight, bias, target, hq, gram, stat, coef, local, safe, hm = ctx.saved_tensors
        group, rank, lo, ignore_index, allow_tf32, Vtot, has_bias, split, coarse = ctx.opts
        acc = gram.dtype
        prod = _Products(split, acc)
        d = gram.shape[0]
        m, bm = stat[:d], stat[d]
        g = grad_rows.to(acc)
        ab = coef[:, :2] * g[:, None]  # [A, B]: the weight and bias gradients
        A, B = ab[:, 0], ab[:, 1]
        gam = torch.where(local, coef[:, 3:] * g[:, None], torch.zeros_like(coef[:, 3:]))
        grad_h = grad_w = grad_b = None
        with _exact_products(hidden.device, allow_tf32):
            if ctx.needs_input_grad[0]:  # the dense part once (rank 0), every rank's target rows, summed
                # [A, B_m]: the target rows enter as w_c - m, and B_m = B + Σ_j γ_j is formed without cancelling
                ab_h = torch.stack([A, coef[:, 2] * g], 1)
                gh = torch.ops.fastloss.spherical_grad_hidden(hq, ab_h, gam, weight, target, stat, lo, ignore_index,
                                                              group is None or rank == 0)
                if ctx.delta is not None and (group is None or rank == 0):  # dL/dmu times the mean's last bit
                    gh.addr_(B, ctx.delta)
                if group is not None:
                    torch.distributed.all_reduce(gh, group=group)
                grad_h = gh.to(hidden.dtype)
            if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
                # ∇W = 2 W_c G + 1 rowᵀ + 2 b_c vᵀ + target rows. fp32 / fp64 products centre each chunk of W as they
                # convert it (w - m is exact beside a large mean; W G - 1 (G m)ᵀ would cancel), so row = HᵀB / V
                # (- 2 G δ for the exact mean). The bf16 split keeps W as it is (exact in bf16) and takes
                # row = HᵀB / V - 2 G m with G m = Hᵀ (A ⊙ h·m) from the exact h·m. v = HᵀA in the same pass.
                # weight_grad_precision="bf16": 2G enters W's GEMM rounded to bf16 once, as M, and G comes from one
                # GEMM over bf16(A ⊙ h). The row term then takes m·M from that same M, so that W M - 1 (mᵀ M) is
                # (W - 1 mᵀ) M exactly: W's shared mean cancels whatever M's rounding, and the error is that of
                # the centred product, about one bf16 rounding of it.
                centre = not split
                vb = prod.times(hidden.t(), torch.stack([A, B / Vtot - (0 if centre or coarse else 2 * A * hm)], 1))
                v, row = vb[:, 0], vb[:, 1]
                G = prod.weighted_gram(hidden, A, coarse)
                if centre and ctx.delta is not None:
                    row = row - 2 * (G @ ctx.delta)
                # the bias about its exact mean: b - bm, then the rounded mean's last bit (b ~ bm cancels in fp32)
                bc = (bias.to(acc) - bm) - ctx.delta_b if has_bias else None
                want_b = has_bias and ctx.needs_input_grad[2]
                wv = weight.new_empty((weight.shape[0],), dtype=acc) if want_b else None  # W_c v, for ∇b
                gw = torch.empty(weight.shape, dtype=acc, device=weight.device)
                g2 = prod.operand(2 * G, coarse)  # split (or rounded) once for every chunk of W
                if coarse:  # mᵀM elementwise: a matmul could take TF32 (allow_tf32) and break the cancellation
                    row = row - (m[:, None] * g2[0].to(acc)).sum(0)
                # fp16 / bf16 weights: the rank-one terms join in the pass that rounds gw into the weight's dtype
                # (spherical_weight_grad), instead of a broadcast copy and an outer-product pass over gw each
                finish = weight.dtype != acc
                buf = weight.new_empty((min(_CHUNK_ROWS, weight.shape[0]), d), dtype=acc) if centre else None
                step = prod.row_step(weight, copies=centre)
                for r0 in range(0, weight.shape[0], step):
                    rows_w = slice(r0, r0 + step)
                    x = weight[rows_w]
                    if centre:  # one chunk buffer for all chunks
                        x = torch.sub(x, m, out=buf[:x.shape[0]])
                    prod.times(x, g2, None if finish else row, out=gw[rows_w])
                    if want_b:
                        wv[rows_w] = prod.times(x, v[:, None])[:, 0]
                if has_bias and not finish:
                    gw.addr_(bc, v, alpha=2)
                idx = safe.reshape(-1)
                gw.index_put_((idx,), (gam[..., None] * hidden[:, None, :]).reshape(-1, d), accumulate=True)
                if finish:
                    grad_w = torch.ops.fastloss.spherical_weight_grad(gw, row, bc, v, weight.dtype)
                else:
                    grad_w = gw
                if want_b:
                    if not centre:
                        wv = wv - m @ v
                    elif ctx.delta is not None:  # (w - m̃) v - δ v
                        wv = wv - ctx.delta @ v
                    gb = 2 * (wv + bc * A.sum()) + B.sum() / Vtot
                    gb = gb.index_put((idx,), gam.reshape(-1), accumulate=True)
                    grad_b = gb.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None, None, None


def linear_spherical_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    loss: str = "zloss",
    a: float = 1.0,
    b: float = 0.0,
    eps: float = DEFAULT_EPS,
    target_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    process_group=None,
    allow_tf32: bool = False,
    bf16_split: bool | None = None,
    centred_gram: bool | None = None,
    weight_grad_precision: str = "fp32",
):
    """A spherical loss of the logits ``hidden @ weight.T + bias`` computed without forming them.

    ``hidden (..., d)``, ``weight (V, d)``, ``bias (V,)`` or None, ``target (...)`` class ids (or ``(..., K)`` with
    ``target_weight``, as in :mod:`fastloss.spherical`); ``loss`` is one of ``"zloss"`` (with ``a``, ``b``),
    ``"spherical_softmax"`` (with ``eps``), ``"taylor_softmax"`` (order 2) and ``"mse"``, each equal to the same
    function on the materialised logits. Gradients for hidden, weight and bias are exact, so any optimizer works.
    Cost per call: ``V·d²`` for the centred Gram (fp32 products, or fp64 for fp64 inputs) plus ``O(N·d²)``.

    Precision, fp32 inputs: loss and gradients within 1e-5 of the float64 materialised reference, also for an
    ill-conditioned weight or large shared means: measured within 3e-7 up to a logit mean 2000 times the spread
    ((μ² + σ²) / σ² ≈ 4e6) and within 1e-5 to 2e4 times (the Z-loss's hidden gradient 1.3e-5 there), and no
    worse than ``F.linear`` in fp32 followed by the loss where the hidden rows are nearly orthogonal to a large
    weight mean or the bias has a large mean (``python bench/gram_accuracy.py``, ``test_float32_precision``).
    That takes the centred Gram, and u = W_cᵀb_c, from exactly centred rows; the target outputs gathered and h·m
    accumulated in double; the last bits δ of the rounded weight and bias means put back into μ, o_c − μ and the
    gradients (vocab-parallel too: each shard's residual sums about its rounded means are pooled); the targets'
    share of the hidden gradient taken about the mean, with its coefficient in closed form; and the weight
    gradient from centred chunks of W. What the Gram form cannot match: a row whose logits are nearly constant
    against |W_c||h| (h almost orthogonal to the centred weight rows) gets its spread from hᵀQ_c h, relatively
    off by ~ε(|W_c||h|/σ)² where logits formed directly are off by ~ε|W_c||h|/σ (the Gram squares that
    conditioning, as normal equations do); the Z-loss, which divides by σ, feels it first.

    Gradient accumulation: use ``reduction="sum"`` and divide by the global count of counted rows yourself, e.g.
    ``loss = linear_spherical_loss(h, W, t, reduction="sum") / n_tokens_in_step``.

    Vocab parallel: with ``process_group``, ``weight`` (and ``bias``) are this rank's contiguous shard of rows, in
    rank order; ``hidden`` and ``target`` (global class ids) are the same on every rank. The loss equals the
    unsharded call on every rank, ``hidden`` gets the full gradient on every rank and each rank gets its shard's
    weight gradient. Communication: one all-reduce in the forward (shard Grams, sums and target outputs packed)
    and one of the target part of the hidden gradient (N x d) in the backward.

    ``bf16_split``: ``None`` (default) uses bf16 tensor-core products with hi/lo-split fp32 operands for bfloat16
    inputs on CUDA and fp32 products otherwise; ``False`` always upcasts to fp32 products; ``True`` forces the
    split (bfloat16 inputs only; on CPU it is emulated, for testing). Both agree to about 1e-5 relative.

    ``centred_gram``: how the weight's Gram is formed. ``True`` centres the weight rows first, exact however large
    the rows' shared mean is. ``False`` forms the raw Gram ``WᵀW`` and subtracts ``V·m mᵀ``: with the bf16 split
    that is one bf16 GEMM over the weight instead of two (2·V·d² fewer flops per step), but the subtraction
    cancels, so the row statistics lose accuracy in proportion to ``(μ² + σ²) / σ²`` of each row's logits (mean
    μ, spread σ): about ``2e-7`` times that ratio for the variance, less for the loss. ``None`` (default):
    ``False`` on the bf16 split path, ``True`` otherwise. The split path returns bf16 losses and gradients
    (rounding 4e-3); there a ratio of 1e4 (a logit mean 100 times the spread) moves the fp32 per-row losses by
    3e-4 relative and 1e5 by 3e-3, while the same losses of bf16-materialised logits (``F.linear``, then the
    loss) are off by 4e-2 and 2e-1 for the Z-loss (``python bench/gram_accuracy.py``).

    ``weight_grad_precision``: ``"fp32"`` (default) or ``"bf16"``, on the bf16 split path only (elsewhere the
    products are fp32 and it changes nothing). ``"bf16"`` rounds the weight gradient's d×d factor
    ``2·Hᵀdiag(a)H`` to bf16 once instead of splitting it, and forms it from one GEMM over ``bf16(a ⊙ h)``: one
    GEMM over the weight and one over the hidden states instead of two each, ``4·V·d² + 6·N·d²`` flops per step
    instead of ``6·V·d² + 8·N·d²``. The row term is taken from the same rounded factor, so the weight's shared
    mean still cancels exactly, and the weight gradient is off by about one more bf16 rounding: measured 1.7e-3
    to 2.7e-3 norm-wise on the rows no target names, against 1.7e-3 by default (its bf16 output rounding) and
    2.0e-3 to 5.5e-2 for the weight gradient of bf16-materialised logits (``python bench/gram_accuracy.py``,
    N=256, d=256, V=8192). The loss and the hidden and bias gradients are unchanged.
    """
    fn = "fastloss.linear_spherical_loss"
    hidden, weight, bias = _autocast_operands(hidden, weight, bias)
    kind, multi = _check_linear_args(fn, hidden, weight, target, bias, loss, target_weight, ignore_index,
                                     reduction)
    a, b = V.check_zloss_args(fn, a, b)
    eps = V.check_finite(fn, "eps", eps, nonnegative=True)
    allow_tf32 = V.check_bool(fn, "allow_tf32", allow_tf32)
    split = _use_split(fn, bf16_split, hidden)
    if centred_gram is not None and not isinstance(centred_gram, bool):
        raise TypeError(f"{fn}: centred_gram must be None, True or False, got {centred_gram!r}")
    centred = not split if centred_gram is None else centred_gram
    if weight_grad_precision not in ("fp32", "bf16"):
        raise ValueError(f"{fn}: weight_grad_precision must be 'fp32' or 'bf16', got {weight_grad_precision!r}")
    checkable = process_group is None and not torch.compiler.is_compiling()
    if checkable and (V.get_validation() or hidden.device.type == "cpu"):
        V.check_target_range(fn, target, weight.shape[0], ignore_index)
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    K = target.shape[-1] if multi else 1
    t = target.reshape(-1, K).long()
    w = target_weight.reshape(-1, K) if target_weight is not None else None
    if not _ops.use_kernel("spherical_row_terms", hidden.device):
        from . import reference
        return reference.linear_spherical_loss(hidden, weight, target, bias=bias, loss=loss, a=a, b=b, eps=eps,
                                               target_weight=target_weight, ignore_index=ignore_index,
                                               reduction=reduction)
    rows, _ = _LinearSpherical.apply(h, weight, bias, t, w, kind, a, b, eps, ignore_index, process_group,
                                     allow_tf32, split, centred, weight_grad_precision == "bf16")
    out = reduce_rows(rows, (t != ignore_index).any(-1), reduction)
    if reduction == "none":
        out = out.reshape(target.shape[:-1] if multi else target.shape)
    return out.to(hidden.dtype)


# bf16 GEMMs with fp32 output and in-place fp32 accumulation: aten::mm.dtype and aten::addmm.dtype with an fp32
# `self` (torch >= 2.10 on CUDA; 2.9 wanted `self` in the matrices' dtype).
_HAS_MM_DTYPE = "dtype" in torch.ops.aten.mm.overloads() and torch.torch_version.TorchVersion(
    torch.__version__) >= (2, 10)


def _use_split(fn: str, bf16_split, hidden: torch.Tensor) -> bool:
    if bf16_split is None:
        return hidden.dtype == torch.bfloat16 and hidden.device.type == "cuda" and _HAS_MM_DTYPE
    if not isinstance(bf16_split, bool):
        raise TypeError(f"{fn}: bf16_split must be None, True or False, got {bf16_split!r}")
    if bf16_split and hidden.dtype != torch.bfloat16:
        raise ValueError(f"{fn}: bf16_split=True needs bfloat16 hidden and weight, got {hidden.dtype}")
    if bf16_split and hidden.device.type == "cuda" and not _HAS_MM_DTYPE:
        raise RuntimeError(f"{fn}: bf16_split=True needs torch >= 2.10 (torch.mm / addmm with out_dtype)")
    return bf16_split


def _autocast_operands(hidden, weight, bias):
    """Inside torch.autocast the logits would be a matmul, so the operands follow autocast's rule for one: float32
    hidden, weight and bias are cast to the autocast dtype (as F.linear's would be, e.g. fp32 master weights with
    bf16 activations), with gradients flowing back to the float32 tensors. Outside autocast nothing is cast and
    mixed dtypes are an error."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def _check_linear_args(fn, hidden, weight, target, bias, loss, target_weight, ignore_index, reduction):
    V.check_linear_layer(fn, hidden, weight, bias)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if loss not in KINDS:
        raise ValueError(f"{fn}: loss must be one of {tuple(KINDS)}, got {loss!r}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold integer class indices, got {target.dtype}")
    if target.device != hidden.device:
        raise ValueError(f"{fn}: target is on {target.device} but hidden is on {hidden.device}")
    lead = tuple(hidden.shape[:-1])
    if tuple(target.shape) == lead:
        multi = False
    elif target.dim() == len(lead) + 1 and tuple(target.shape[:-1]) == lead and target.shape[-1] >= 1:
        multi = True
    else:
        raise ValueError(f"{fn}: target must have shape {lead} (hidden without its last dimension) or {lead} + (K,),"
                         f" got {tuple(target.shape)}")
    if target_weight is not None:
        if not isinstance(target_weight, torch.Tensor) or target_weight.shape != target.shape:
            raise ValueError(f"{fn}: target_weight must be a tensor of the shape of target {tuple(target.shape)}")
        if not target_weight.dtype.is_floating_point or target_weight.device != hidden.device:
            raise TypeError(f"{fn}: target_weight must be a floating tensor on {hidden.device}")
        V.check_no_grad(fn, "target_weight", target_weight)
    V.check_reduction(fn, reduction)
    V.check_ignore_index(fn, ignore_index)
    return KINDS[loss], multi
