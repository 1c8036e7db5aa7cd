import pytest
import torch as th


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
