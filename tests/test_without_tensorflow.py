"""The training path runs where TensorFlow is missing: the real Trainer on numpy batches."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ImportError(f"{name} is blocked in this test")
            return None


    sys.meta_path.insert(0, NoTensorFlow())
    # As where it is not installed: importlib.util.find_spec (which etils asks) says None.
    sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORFLOW + textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_gpu_check_trains_through_the_trainer_with_tensorflow_blocked():
    proc = run_blocked(
        """
        import json
        import numpy as np
        import benchmarks.gpu_train_check as check
        import mlcnc_jax.experiment, mlcnc_jax.trainer, mlcnc_jax.step, mlcnc_jax.predict  # noqa

        data = check.random_data(16, num_classes=4, n=16)
        r = check.run_check(
            data, backbone="resnet_small", image_size=16, batch_size=8, dtype="float32",
            steps=3, warmup_steps=1, learning_rate=1e-3, logit_scale_init=1.0,
            eval_batch_size=8, min_gain=0.0,
        )
        assert sys.modules["tensorflow"] is None  # never imported
        assert np.isfinite(r["loss_last"]) and r["step_median_s"] > 0
        print("RESULT", json.dumps({"num_test": r["num_test"], "map": r["test_map"]["total"]}))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    assert '"num_test": 16' in line


def test_prediction_imports_no_training_module():
    proc = run_blocked(
        """
        import mlcnc_jax.predict
        training = sorted(
            m for m in sys.modules
            if m in ("mlcnc_jax.trainer", "mlcnc_jax.step", "mlcnc_jax.optim",
                     "mlcnc_jax.objective", "mlcnc_jax.experiment", "mlcnc_jax.state")
        )
        assert not training, training
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_config_layer_and_the_built_in_data_renderer_need_neither_tensorflow_nor_jax():
    # the config checks take the built-in data's names from synthetic_labels (numpy only), and
    # the images are drawn with numpy and PIL: TensorFlow is needed only to store them (tfds).
    proc = run_blocked(
        """
        import mlcnc_jax.configuration

        # (The blocker holds sys.modules["tensorflow"] = None, as for a missing package.)
        light = sorted(m for m in ("jax", "flax", "PIL", "tensorflow") if sys.modules.get(m))
        assert not light, f"configuration imported {light}"

        from mlcnc_jax.data import synthetic_render

        (key, png, row), = synthetic_render.generate("target", 32, 0, "test", [5])
        assert key == "test_00005" and png[:4] == b"\\x89PNG" and row.sum() >= 1
        heavy = sorted(m for m in ("jax", "flax", "tensorflow") if sys.modules.get(m))
        assert not heavy, f"synthetic_render imported {heavy}"

        # The GPU check's data file is made the same way, on any host.
        import os, tempfile
        from benchmarks import gpu_data

        path = os.path.join(tempfile.mkdtemp(), "d.npz")
        gpu_data.make_data(path, image_size=16, num_test=4)
        data = gpu_data.load_data(path, 16)
        assert data.train.images.shape == (1104, 16, 16, 3) and len(data.test) == 4
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
