"""
Tests for guided_diffusion/guidance.py: the classifier-guidance gradient and the
classifier-free guidance mix, in closed form on tiny stand-in networks.
"""

import pytest
import torch as th
import torch.nn.functional as F

from guided_diffusion.guidance import (
    check_classifier,
    check_classifier_free,
    classifier_cond_fn,
    classifier_free_model,
)


class LinearClassifier(th.nn.Module):
    """logits = W @ mean-over-pixels(x) + b, ignoring the timestep."""

    def __init__(self, num_classes=4, channels=3, image_size=8):
        super().__init__()
        self.image_size, self.out_channels = image_size, num_classes
        generator = th.Generator().manual_seed(0)
        self.weight = th.nn.Parameter(th.randn(num_classes, channels, generator=generator))
        self.bias = th.nn.Parameter(th.randn(num_classes, generator=generator))

    def forward(self, x, t):
        return x.mean(dim=(2, 3)) @ self.weight.T + self.bias


def test_cond_fn_is_the_scaled_gradient_of_log_softmax_at_the_label():
    classifier = LinearClassifier()
    x = th.randn(5, 3, 8, 8, generator=th.Generator().manual_seed(1))
    y = th.tensor([0, 1, 2, 3, 1])
    gradient = classifier_cond_fn(classifier, 2.5)(x, th.zeros(5, dtype=th.long), y=y)
    # Closed form: d/dx log softmax(W m + b)_y with m the pixel mean is
    # (W_y - softmax @ W) / (H * W), the same at every pixel.
    probs = F.softmax(classifier(x, None), dim=-1)
    per_pixel = (classifier.weight[y] - probs @ classifier.weight) / 64
    expected = 2.5 * per_pixel[:, :, None, None].expand_as(x)
    assert th.allclose(gradient, expected.detach(), atol=1e-6)


def test_cond_fn_keeps_no_graph_and_zero_scale_gives_zeros():
    classifier = LinearClassifier()
    x = th.randn(2, 3, 8, 8, requires_grad=True)
    y = th.tensor([1, 2])
    with th.no_grad():
        gradient = classifier_cond_fn(classifier, 1.0)(x, th.zeros(2, dtype=th.long), y=y)
    assert not gradient.requires_grad and gradient.grad_fn is None
    assert x.grad is None and classifier.weight.grad is None
    zero = classifier_cond_fn(classifier, 0.0)(x, th.zeros(2, dtype=th.long), y=y)
    assert th.equal(zero, th.zeros_like(x))
    with pytest.raises(ValueError, match="target labels"):
        classifier_cond_fn(classifier, 1.0)(x, th.zeros(2, dtype=th.long))


class LabelShift(th.nn.Module):
    """output = [x + label, x * label (variance channels)], recording its inputs."""

    num_classes = 5  # 4 classes and the null label 4

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y=None, low_res=None):
        self.calls.append((x.shape[0], y.clone(), None if low_res is None else low_res.clone()))
        shift = y.float()[:, None, None, None]
        if low_res is not None:
            shift = shift + low_res
        return th.cat([x + shift, x * shift], dim=1)


def test_classifier_free_mix_one_forward_of_2n_and_variance_from_conditional_half():
    model = LabelShift()
    x = th.randn(3, 3, 4, 4)
    y = th.tensor([0, 2, 3])
    low_res = th.randn(3, 3, 4, 4)
    out = classifier_free_model(model, 3.0, null_label=4)(x, th.zeros(3, dtype=th.long), y=y, low_res=low_res)
    assert len(model.calls) == 1
    size, labels, seen_low_res = model.calls[0]
    assert size == 6 and labels.tolist() == [0, 2, 3, 4, 4, 4]
    assert th.equal(seen_low_res, th.cat([low_res, low_res]))
    eps_cond, eps_uncond = x + y[:, None, None, None] + low_res, x + 4 + low_res
    assert th.allclose(out[:, :3], eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-5)
    assert th.equal(out[:, 3:], x * (y[:, None, None, None] + low_res))


def test_classifier_free_scale_one_is_exactly_conditional_and_zero_unconditional():
    model = LabelShift()
    x = th.randn(2, 3, 4, 4)
    y = th.tensor([1, 3])
    t = th.zeros(2, dtype=th.long)
    conditional = model(x, t, y=y)
    assert th.equal(classifier_free_model(model, 1.0, 4)(x, t, y=y), conditional)
    unconditional = classifier_free_model(model, 0.0, 4)(x, t, y=y)
    assert th.allclose(unconditional[:, :3], x + 4)


def test_classifier_free_refuses_models_without_a_null_row():
    assert check_classifier_free(LabelShift(), 2.0, num_classes=4) == 4
    with pytest.raises(ValueError, match="5 rows for num_classes=5.*class_dropout_prob"):
        check_classifier_free(LabelShift(), 2.0, num_classes=5)
    with pytest.raises(ValueError, match="unconditional"):
        check_classifier_free(th.nn.Linear(1, 1), 2.0, num_classes=4)


def test_check_classifier_refuses_other_image_sizes_and_class_counts():
    check_classifier(LinearClassifier(image_size=8), 8, 4)
    with pytest.raises(ValueError, match="16x16 images but the model samples 8x8"):
        check_classifier(LinearClassifier(image_size=16), 8, 4)
    with pytest.raises(ValueError, match="predicts 4 classes but labels are drawn from 10"):
        check_classifier(LinearClassifier(), 8, 10)
