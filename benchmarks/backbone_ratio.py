"""XLA against PyTorch on the CPU: one training step of the same small ResNet, side by side.

The built-in config's backbone is chosen for accuracy per CPU second, and XLA's CPU
convolutions are slower than PyTorch's (oneDNN) for small ResNets. This script measures
by how much: the same network (the basic-block ResNet of `models/resnet.py` with the
given name, global average pooling and a linear classifier), the same batch size, BCE
and Adam, one full training step (forward, backward, update): in JAX the library's own
step of the baseline model (`experiment.build(...).trainer.train_step`, which also
updates the weights' moving average), in PyTorch eager (torch.compile off); timed in
alternating rounds in one process so that both see the same machine load. Needs torch
(a test dependency, not a runtime one).

    python -m benchmarks.backbone_ratio                       # resnet_small, 32 px, batch 64
    python -m benchmarks.backbone_ratio --backbones resnet_small,resnet18 --image_size 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from benchmarks import common


def _jax_step(name: str, image_size: int, batch: int, classes: int):
    """The library's train step of the plain baseline (`experiment.build`, BCE only)."""
    import tempfile

    import jax

    from benchmarks.gpu_data import random_data
    from configs.default import get_config
    from mlcnc_jax import experiment

    config = get_config()
    config.model.update(name="baseline", backbone=name, pretrained="none")
    config.loss.update(two_way=0.0, fla=0.0, fpc=0.0, bce=1.0, warmup_epochs=0)
    config.data.image_size, config.dtype = image_size, "float32"
    config.train.batch_size = config.eval.batch_size = batch
    config.train.steps_per_epoch, config.train.num_epochs = 10**6, 1
    dataset = random_data(image_size, classes, n=batch, positive_rate=0.1)
    with tempfile.TemporaryDirectory() as workdir:
        run = experiment.build(config, workdir, dataset=dataset, reports=False)
        state = run.placement.place(run.initial_state())
    train = dataset.train
    inputs = run.placement.shard({"image": train.images, "labels": train.labels.astype(np.float32)})
    holder = {"state": state}

    def step():
        holder["state"], metrics = run.trainer.train_step(holder["state"], inputs)
        jax.block_until_ready(metrics["loss"])

    return step


def _torch_step(name: str, image_size: int, batch: int, classes: int):
    import torch
    from torch import nn

    from mlcnc_jax.models.resnet import SMALL_STEM_STRIDES, get_backbone

    net = get_backbone(name)  # the JAX module's architecture: stages, widths, stem
    if net.block != "basic" or net.stem not in SMALL_STEM_STRIDES:
        raise ValueError(f"{name}: only the small basic-block ResNets are compared here")

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    widths = net.widths
    layers = [
        nn.Conv2d(3, widths[0], 3, SMALL_STEM_STRIDES[net.stem], 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for i, (n, w) in enumerate(zip(net.stage_sizes, widths, strict=True)):
        for j in range(n):
            layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    model = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)
    ).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, image_size, image_size)
    y = (torch.rand(batch, classes) < 0.1).float()
    loss_fn = nn.BCEWithLogitsLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return run


def measure(backbones, image_size: int, batch: int, classes: int, rounds: int, steps: int):
    """Median step seconds of each framework per backbone, timed in alternating rounds."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for name in backbones:
        runs = {
            "jax": _jax_step(name, image_size, batch, classes),
            "torch": _torch_step(name, image_size, batch, classes),
        }
        times = {k: [] for k in runs}
        for fn in runs.values():  # compile / warm up
            fn()
            fn()
        for _ in range(rounds):
            for key, fn in runs.items():
                start = time.perf_counter()
                for _ in range(steps):
                    fn()
                times[key].append((time.perf_counter() - start) / steps)
        jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
        rows.append((name, jax_s, torch_s, min(times["jax"]), min(times["torch"])))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet_small")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = measure(
        args.backbones.split(","),
        args.image_size,
        args.batch,
        args.classes,
        args.rounds,
        args.steps,
    )
    load_after = os.getloadavg()[0]
    print(
        f"{common.cpu_model()}, {os.cpu_count()} cores; load average "
        f"(1 min) {load_before:.2f} before / {load_after:.2f} after; batch {args.batch}, "
        f"{args.image_size} px, {args.classes} classes; median of {args.rounds} rounds of "
        f"{args.steps} steps, alternating"
    )
    print()
    print(
        "| backbone | JAX/XLA step (ms) | PyTorch step (ms) | XLA / PyTorch (median) | XLA / PyTorch (best) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, j, t, jmin, tmin in rows:
        print(f"| {name} | {1e3 * j:.0f} | {1e3 * t:.0f} | {j / t:.2f} | {jmin / tmin:.2f} |")


if __name__ == "__main__":
    main()
