"""Training-step time of the MLC-NC model on the current device.

Times one jit-compiled step (forward, backward, Adam update, BatchNorm statistics)
of backbone + MLC-NC head for each number of classes, and prints a markdown table.
Compilation is timed separately; the step time is the median over `--steps` steps
after one warm-up step. The loss is sigmoid BCE on the logits plus a term on the
class features, so every part of the head is differentiated; the loss choice does
not change the cost of the model noticeably.

    python benchmarks/step_time.py                      # ResNet-50, 224 px, batch 8, K=20,80
    python benchmarks/step_time.py --backbone resnet_small --image_size 64 --batch_size 64
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.default import get_config  # noqa: E402
from mlcnc_jax.models import create_model  # noqa: E402


def time_step(
    backbone: str, num_classes: int, image_size: int, batch_size: int, dtype: str, steps: int
) -> dict[str, float]:
    """Compiles and times one training step.

    Args:
        backbone: backbone name (see mlcnc_jax.models.resnet.BACKBONES).
        num_classes: K.
        image_size: square input size in pixels.
        batch_size: images per step.
        dtype: 'float32' or 'bfloat16' computation.
        steps: number of timed steps after the warm-up step.

    Returns:
        compile_s, init_s, and step_s (median), step_min_s, step_max_s in seconds.
    """
    config = get_config()
    config.model.backbone = backbone
    config.dtype = dtype
    model = create_model(config, num_classes)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch_size, image_size, image_size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, (batch_size, num_classes)), jnp.float32)

    t0 = time.perf_counter()
    variables = jax.jit(lambda: model.init(jax.random.key(0), images, train=False))()
    jax.block_until_ready(variables)
    init_s = time.perf_counter() - t0
    params = variables["params"]
    frozen = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)

    def loss_fn(params, frozen, rng):
        out, updates = model.apply(
            {"params": params, **frozen},
            images,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        feats = out["class_features"]
        cos = jnp.sum(feats * out["label_embedding"], -1) / jnp.maximum(
            jnp.linalg.norm(feats, axis=-1), 1e-6
        )
        bce = optax.sigmoid_binary_cross_entropy(out["logits"], labels).mean()
        return bce - 0.5 * cos.mean(), updates

    def step(params, frozen, opt_state, rng):
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, rng)
        deltas, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, deltas), {**frozen, **updates}, opt_state, loss

    rng_key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, frozen, opt_state, rng_key).compile()
    )
    compile_s = time.perf_counter() - t0

    state = (params, frozen, opt_state)
    times = []
    for i in range(steps + 1):  # the first step is a warm-up
        t0 = time.perf_counter()
        *state, loss = compiled(*state, jax.random.fold_in(rng_key, i))
        jax.block_until_ready((state, loss))
        if i:
            times.append(time.perf_counter() - t0)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss {float(loss)} in the benchmark step")
    return {
        "init_s": init_s,
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "step_max_s": max(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--classes", default="20,80", help="comma-separated numbers of classes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    args = parser.parse_args()

    dev = jax.devices()[0]
    print(
        f"Device: {dev.platform} / {dev.device_kind} (x{jax.device_count()}), "
        f"jax {jax.__version__}; {args.backbone} + MLC-NC head (D=768, p=20, mha), "
        f"{args.image_size} px, batch {args.batch_size}, {args.dtype}, "
        f"median of {args.steps} steps after 1 warm-up step\n"
    )
    print("| classes | compile (s) | step median (s) | step min-max (s) | images/s |")
    print("|---:|---:|---:|---:|---:|")
    for k in (int(c) for c in args.classes.split(",")):
        r = time_step(args.backbone, k, args.image_size, args.batch_size, args.dtype, args.steps)
        print(
            f"| {k} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
            f"{r['step_min_s']:.3f}-{r['step_max_s']:.3f} | {args.batch_size / r['step_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
