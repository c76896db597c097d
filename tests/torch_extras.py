"""Imports of the test-only PyTorch references (open_clip, timm), skipping when absent.

Both import torchvision. A torchvision wheel built for CUDA torch cannot load its C++
operators under a CPU-only torch of the same version, and its import then fails while
registering fake kernels for those operators; the tests use none of them (only the
models), so that registration is skipped for the import. The models themselves are
plain torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest


def _import_torchvision() -> None:
    torch = pytest.importorskip("torch")
    try:
        importlib.import_module("torchvision")
        return
    except ImportError:
        pytest.skip("torchvision is not installed (open_clip and timm need it)")
    except RuntimeError:
        pass  # its C++ operators did not load: import it without their registrations

    def skip(*args, **kwargs):
        return lambda fn=None, *a, **k: fn

    names = ("register_fake", "register_autograd", "impl_abstract")
    saved = {n: getattr(torch.library, n) for n in names if hasattr(torch.library, n)}
    for name in saved:
        setattr(torch.library, name, skip)
    try:
        for mod in [m for m in list(sys.modules) if m.startswith("torchvision")]:
            del sys.modules[mod]
        importlib.import_module("torchvision")
    finally:
        for name, fn in saved.items():
            setattr(torch.library, name, fn)


def open_clip():
    """The open_clip package, or a skip when it is not installed."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open-clip-torch is not installed (requirements-dev.txt)")
    _import_torchvision()
    return importlib.import_module("open_clip")


def timm():
    """The timm package, or a skip when it is not installed."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (requirements-dev.txt)")
    _import_torchvision()
    return importlib.import_module("timm")
