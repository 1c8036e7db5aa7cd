import os

import pytest
import torch as th

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N worker processes share the cores, one torch thread each.
    th.set_num_threads(1)


class TinyDenoiser(th.nn.Module):
    """
    A seeded stand-in for a diffusion model: a 1x1 convolution whose output is
    modulated by the timestep, taking (x, timesteps, **kwargs) like UNetModel.
    """

    def __init__(self, in_channels=3, out_channels=3, seed=0):
        super().__init__()
        generator = th.Generator().manual_seed(seed)
        self.conv = th.nn.Conv2d(in_channels, out_channels, 1)
        with th.no_grad():
            self.conv.weight.copy_(th.randn(self.conv.weight.shape, generator=generator) * 0.3)
            self.conv.bias.copy_(th.randn(self.conv.bias.shape, generator=generator) * 0.1)
        self.calls = []

    def forward(self, x, timesteps, **kwargs):
        self.calls.append(timesteps.clone())
        scale = 1.0 + th.cos(timesteps.float() / 100.0)[:, None, None, None]
        return th.tanh(self.conv(x) * scale)


@pytest.fixture
def tiny_model():
    """
    Factory for TinyDenoiser(in_channels=3, out_channels=3, seed=0); it records
    the timesteps of every call in .calls.
    """
    return TinyDenoiser


@pytest.fixture
def isolated_logger():
    """
    Restore guided_diffusion.logger's current logger after the test, so a test can
    call logger.configure without leaking its directory into later tests.
    """
    from guided_diffusion import logger

    previous = logger.Logger.CURRENT
    yield logger
    if logger.Logger.CURRENT not in (None, previous, logger.Logger.DEFAULT):  # None: a test reset it
        logger.Logger.CURRENT.close()
    logger.Logger.CURRENT = previous


@pytest.fixture(scope="session")
def tiny_image_dir(tmp_path_factory):
    """
    A folder of 8 random 12x12 PNG images named c0_0.png, c1_1.png, c2_2.png, ...
    (classes c0, c1, c2 by file-name prefix).
    """
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiny_images")
    generator = np.random.default_rng(0)
    for i in range(8):
        pixels = generator.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % 3}_{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def torch_single_thread():
    """
    Run the tests of a module with one intra-op torch thread (tiny models are faster
    so, spinning worker threads do not slow down tests running side by side, and
    results that must match bit for bit do not depend on the machine's core count).
    """
    previous = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(previous)


# The files whose end-to-end runs take longest: collected first, so that with -n N one
# worker starts each of them at once instead of finishing one alone at the end.
LONGEST_FILES = ("test_gpu_check.py", "test_workflows.py", "test_sample_scripts.py",
                 "test_quickstart.py", "test_training_scripts.py", "test_tracking.py")


def pytest_collection_modifyitems(items):
    """Move the tests of LONGEST_FILES to the front, each file's order kept."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
