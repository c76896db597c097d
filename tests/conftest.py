"""Test set-up: 8 fake CPU devices, so data-parallel code paths run on one CPU."""

import os
import pathlib

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite builds the same tiny models many times (and in subprocesses, which inherit this):
# XLA's compiled programs are cached on disk for the session, so each compiles once. One
# cache per pytest process (each pytest-xdist worker makes its own, instead of inheriting
# the controller's): JAX writes a cache file without a lock, so a process reading an entry
# that another is still writing would load half an executable (and abort).
_OWNER = "MLCNC_JAX_TEST_XLA_CACHE_OWNER"
_INHERITED = os.environ.get(_OWNER) not in (None, str(os.getpid()))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or _INHERITED:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlcnc_jax_test_xla_")
    os.environ[_OWNER] = str(os.getpid())
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

# The official long-tailed split files live beside the repository in CI and in
# development checkouts; a user's clone does not have them.
SHARED_SPLITS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "lt_splits"


@pytest.fixture
def lt_splits_dir() -> pathlib.Path:
    """Directory holding coco_lt.json, voc_lt.json and dbloss_appendix/."""
    if not (SHARED_SPLITS / "coco_lt.json").exists():
        pytest.skip(f"official split files not found at {SHARED_SPLITS} (only in CI/dev checkouts)")
    return SHARED_SPLITS


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """One data root for the whole session: the built-in data is generated once per size.

    Under pytest-xdist (`-n 2`) the workers share it (the session's common temp folder):
    `synthetic.load` holds a lock while it generates, so the first worker to need a
    dataset makes it and the others wait for it.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "datasets"
        root.mkdir(exist_ok=True)
        return str(root)
    return str(tmp_path_factory.mktemp("datasets"))
