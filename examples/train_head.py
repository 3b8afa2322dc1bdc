"""Train a small classifier head on a synthetic 5,000-class problem with fastloss's losses.

    python examples/train_head.py [--loss cross_entropy|zloss] [--device cuda]
"""

import argparse

import torch

import fastloss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loss", choices=["cross_entropy", "zloss"], default="cross_entropy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    d, C = 64, 5000
    centers = torch.randn(C, d, device=args.device)
    model = torch.nn.Sequential(torch.nn.Linear(d, 256), torch.nn.GELU(), torch.nn.Linear(256, C)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = (
        fastloss.nn.CrossEntropyLoss(label_smoothing=0.05, lse_square_scale=1e-4)
        if args.loss == "cross_entropy"
        else fastloss.nn.ZLoss(a=2.0, b=1.0)
    )
    for step in range(args.steps):
        y = torch.randint(0, C, (512,), device=args.device)
        x = centers[y] + 0.5 * torch.randn(512, d, device=args.device)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                acc = (model(x).argmax(-1) == y).float().mean().item()
            print(f"step {step:4d}  {args.loss} {loss.item():.4f}  train accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
