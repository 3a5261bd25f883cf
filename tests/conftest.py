import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "OMP_NUM_THREADS" not in os.environ:     # the project's rule on the shared CPU: OMP_NUM_THREADS=1
    torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the tests that take the `device` fixture: cpu, cuda or cuda:N "
                          "(in-process tests and the scripts they run); cpu_only tests are skipped on CUDA")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: bitwise or CPU-specific, skipped under --device cuda")
    config.addinivalue_line("markers", "cuda_only: needs CUDA (CUDA graphs, sync checks), skipped on the CPU")


def pytest_collection_modifyitems(config, items):
    dev = config.getoption("--device")
    for item in items:
        if dev != "cpu" and "cpu_only" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="CPU-only test (bitwise or CPU threads)"))
        if dev == "cpu" and "cuda_only" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs --device cuda"))


@pytest.fixture(scope="session")
def device(request):
    """The device given by `pytest --device` (default cpu), checked."""
    from common import check_device
    try:
        return check_device(request.config.getoption("--device"))
    except SystemExit as e:                                    # its one `error:` line
        pytest.exit(str(e), returncode=4)


def run_script(*args, ok=True, timeout=300, stdin=None):
    """Run one of the project's scripts in a subprocess from the repository root."""
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, input=stdin)
    if ok:
        assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture
def script():
    return run_script
