"""The real CUDA runtime for the tests marked ``gpu``; they skip, saying why, on a machine without one."""

from __future__ import annotations

import pytest

from edge.errors import BackendError
from edge.inference import cuda


def real_cuda_runtime():
    """cuda-python's runtime module, with at least one GPU visible; otherwise the test is skipped."""
    try:
        runtime = cuda.load_runtime()
    except BackendError:
        pytest.skip("cuda-python is not installed")
    err, count = runtime.cudaGetDeviceCount()[:2]
    if int(err) != 0 or not count:
        pytest.skip(f"no CUDA GPU here ({cuda.error_name(err, runtime)})")
    return runtime
