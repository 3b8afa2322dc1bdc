"""A word-level language-model head on synthetic Zipfian data (V = 100k): FactoredSphericalLinear (Z-loss, exact
implicit SGD, O(d²) per example) against nn.Linear + cross-entropy (O(V·d) per example), same body, same data.

    python examples/train_lm_head.py [--steps 300] [--vocab 100000] [--batch 128]

The data: the next word is a fixed function of the previous word 70% of the time, else a fresh Zipf draw, so a
perfect model reaches ~70% top-1. Prints both loss curves (each in its own loss), wall time per step, and top-1 /
top-10 accuracy on held-out batches.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fastloss


def zipf(n: int, V: int, gen: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    return torch.multinomial(1.0 / ranks, n, replacement=True, generator=gen)


def batches(V: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    follow = torch.randperm(V, generator=torch.Generator().manual_seed(1234))
    while True:
        prev = zipf(batch, V, gen)
        nxt = torch.where(torch.rand(batch, generator=gen) < 0.7, follow[prev], zipf(batch, V, gen))
        yield prev, nxt


class Body(torch.nn.Module):
    def __init__(self, V: int, d: int):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 64, sparse=True)  # sparse: the body's step stays O(batch) too
        self.proj = torch.nn.Linear(64, d)

    def forward(self, tokens):
        return torch.tanh(self.proj(self.emb(tokens)))


def accuracy(logits_fn, body, V, n_batches=8):
    top1 = top10 = total = 0
    with torch.no_grad():
        for (prev, nxt), _ in zip(batches(V, 256, seed=99), range(n_batches), strict=False):
            top = logits_fn(body(prev)).topk(10, dim=-1).indices
            top1 += (top[:, 0] == nxt).sum().item()
            top10 += (top == nxt[:, None]).any(-1).sum().item()
            total += nxt.numel()
    return top1 / total, top10 / total


def train(kind: str, V: int, d: int, steps: int, batch: int, lr: float):
    torch.manual_seed(0)
    body = Body(V, d)
    opt = torch.optim.SGD(body.parameters(), lr=lr)
    if kind == "factored":
        head = fastloss.FactoredSphericalLinear(d, V, loss="zloss")
    else:
        head = torch.nn.Linear(d, V)
        opt.add_param_group({"params": head.parameters()})
    curve, t0 = [], time.perf_counter()
    for step, (prev, nxt) in zip(range(steps), batches(V, batch, seed=0), strict=False):
        opt.zero_grad(set_to_none=True)
        h = body(prev)
        loss = head(h, nxt) if kind == "factored" else F.cross_entropy(head(h), nxt)
        loss.backward()
        opt.step()
        if kind == "factored":
            head.sgd_step(lr)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            curve.append((step, loss.item()))
    wall = time.perf_counter() - t0
    logits = head.logits if kind == "factored" else head
    return curve, wall, accuracy(logits, body, V)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vocab", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.5)
    args = p.parse_args()
    for kind, label in (("factored", "FactoredSphericalLinear + Z-loss"), ("dense", "nn.Linear + cross-entropy")):
        curve, wall, (top1, top10) = train(kind, args.vocab, args.dim, args.steps, args.batch, args.lr)
        print(f"{label}: {wall:.1f} s for {args.steps} steps ({1e3 * wall / args.steps:.1f} ms/step), "
              f"held-out top-1 {top1:.3f}, top-10 {top10:.3f}")
        print("  loss: " + ", ".join(f"{s}: {v:.3f}" for s, v in curve))


if __name__ == "__main__":
    main()
