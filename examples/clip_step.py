"""A few CLIP training steps with fastloss.clip_loss (or --siglip): two linear towers on random paired data.

    PYTHONPATH=python python examples/clip_step.py --batch 4096 --steps 5 [--siglip] [--device cuda]

The loss never builds the batch x batch logits, so the batch can grow far beyond what the materialised loss
fits in memory; the learnable temperature is clamped as in open_clip (scale <= 100).
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

import fastloss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--siglip", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = args.device
    image_tower = torch.nn.Linear(64, args.dim).to(dev)
    text_tower = torch.nn.Linear(48, args.dim).to(dev)
    init_scale, init_bias = (math.log(10.0), -10.0) if args.siglip else (math.log(1 / 0.07), 0.0)
    log_scale = torch.nn.Parameter(torch.tensor(init_scale, device=dev))
    bias = torch.nn.Parameter(torch.tensor(init_bias, device=dev))
    params = [*image_tower.parameters(), *text_tower.parameters(), log_scale, bias]
    opt = torch.optim.AdamW(params, lr=1e-3)
    # paired data: the text is a noisy linear view of the image
    mix = torch.randn(64, 48, device=dev) / 8
    for step in range(args.steps):
        images = torch.randn(args.batch, 64, device=dev)
        texts = images @ mix + 0.5 * torch.randn(args.batch, 48, device=dev)
        t0 = time.perf_counter()
        x = F.normalize(image_tower(images), dim=-1)
        y = F.normalize(text_tower(texts), dim=-1)
        if args.siglip:
            loss = fastloss.siglip_loss(x, y, log_scale.exp(), bias)
        else:
            loss = fastloss.clip_loss(x, y, log_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            log_scale.clamp_(0, math.log(100))
        print(f"step {step}: loss {loss.item():.4f}  scale {log_scale.exp().item():.2f}  "
              f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
