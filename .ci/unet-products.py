#!/usr/bin/env python3
"""Counts the FLOPs of SD 1.5's UNet products at one size, as sdw runs them on a GPU: the
convolutions that Winograd's kernels take (3x3, stride 1, 32 channels or more each way, 512
output pixels or more over the batch: `cpu::winograd::applies`) at their multiplications
(F(4x4, 3x3) in f32: a quarter of the direct ones, --f16: F(2x2, 3x3), 4/9), the others
direct, plus the linear layers; attention's own products (QK^T, PV) apart, one figure per
product kind. Divide a profile's product time by them for a rate (BENCHMARKS.md).

usage: unet-products.py [--size 512] [--batch 2] [--f16]"""
import sys


def main():
    args = sys.argv[1:]
    side = int(args[args.index("--size") + 1]) // 8 if "--size" in args else 64
    batch = int(args[args.index("--batch") + 1]) if "--batch" in args else 2
    winograd = 4 / 9 if "--f16" in args else 1 / 4
    total = {"products": 0.0, "attention": 0.0}

    def conv(cin, cout, s, k=3, stride=1):
        px = batch * (s // stride) ** 2
        taken = k == 3 and stride == 1 and cin >= 32 and cout >= 32 and px >= 512
        total["products"] += 2 * px * cin * cout * k * k * (winograd if taken else 1)

    def resnet(cin, cout, s):
        conv(cin, cout, s)
        conv(cout, cout, s)
        if cin != cout:
            conv(cin, cout, s, k=1)

    def transformer(c, s, heads=8, context=77, width=768):
        tokens, d = batch * s * s, c // heads
        # proj_in, proj_out; self-attention's q, k, v, out; cross-attention's q, out and its
        # k, v over the context; GEGLU's c -> 8c and the feed-forward's 4c -> c.
        linear = 2 + 4 + 2 + 8 + 4
        total["products"] += 2 * tokens * c * c * linear + 2 * 2 * batch * context * width * c
        total["attention"] += 2 * batch * heads * (s * s) * (s * s + context) * d

    chans, sides = [320, 640, 1280, 1280], [side >> i for i in range(4)]
    conv(4, 320, side)
    skips, h = [320], 320
    for i, (c, s) in enumerate(zip(chans, sides)):
        for _ in range(2):
            resnet(h, c, s)
            h = c
            if i < 3:
                transformer(c, s)
            skips.append(c)
        if i < 3:
            conv(c, c, s, stride=2)
            skips.append(c)
    resnet(1280, 1280, sides[3])
    transformer(1280, sides[3])
    resnet(1280, 1280, sides[3])
    for i, (c, s) in enumerate(zip(chans[::-1], sides[::-1])):
        for _ in range(3):
            resnet(h + skips.pop(), c, s)
            h = c
            if i > 0:
                transformer(c, s)
        if i < 3:
            conv(c, c, 2 * s)
    conv(320, 4, side)
    print(f"products (attention's own aside): {total['products'] / 1e9:.1f} GFLOP")
    print(f"attention, each product kind (QK^T, PV, ...): {total['attention'] / 1e9:.1f} GFLOP")


if __name__ == "__main__":
    main()
