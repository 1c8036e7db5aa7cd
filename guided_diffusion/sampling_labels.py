"""
The labels of a sampling run: which classes there are, the labels a caller gives,
and the labels chosen before sampling (uniform from a seed, or balanced per class).
"""

import numpy as np
import torch as th

from .work_split import LABEL_STREAM, check_counts, derived_seed


def balanced_labels(num_samples, num_classes, generator):
    """
    Labels with every class floor(num_samples / num_classes) times; the remaining
    num_samples % num_classes labels go to classes spread evenly over the range
    (class k * num_classes // remainder for k = 0 .. remainder - 1); then shuffled.

    :param num_samples: how many labels.
    :param num_classes: classes 0 .. num_classes - 1.
    :param generator: the torch.Generator of the shuffle.
    :return: an int64 tensor of num_samples labels.
    """
    per_class, remainder = divmod(num_samples, num_classes)
    counts = th.full((num_classes,), per_class, dtype=th.int64)
    counts[[k * num_classes // remainder for k in range(remainder)]] += 1
    ordered = th.repeat_interleave(th.arange(num_classes), counts)
    return ordered[th.randperm(num_samples, generator=generator)]


def choose_labels(num_samples, num_classes, class_balanced=False, seed=None):
    """
    The labels of a run decided before sampling, or None when they are drawn per
    batch from the global RNG (no seed, not balanced: the original behaviour).

    :param num_samples: how many samples.
    :param num_classes: the number of classes.
    :param class_balanced: exact counts per class (see balanced_labels); the
                           shuffle uses the seed, or 0 without one, so that
                           every process computes the same labels.
    :param seed: None, or the run's seed (uniformly random labels).
    :return: an int64 tensor of num_samples labels, or None.
    """
    generator = th.Generator().manual_seed(derived_seed(seed or 0, LABEL_STREAM))
    if class_balanced:
        return balanced_labels(num_samples, num_classes, generator)
    if seed is None:
        return None
    return th.randint(0, num_classes, (num_samples,), generator=generator)


def resolve_num_classes(model, classifier, num_classes, cfg_scale):
    """
    The number of real classes: given, else the model's embedding rows (less the
    null row under classifier-free guidance), else the classifier's outputs.
    """
    if num_classes is not None:
        check_counts(num_classes=num_classes)
        return num_classes
    rows = getattr(model, "num_classes", None)
    if rows is not None:
        return rows - 1 if cfg_scale is not None else rows
    if classifier is not None:
        return classifier.out_channels
    return None


def check_labels(labels, uses_labels, num_classes):
    """
    :return: labels as an int64 CPU tensor (or None), checked against num_classes.
    """
    if labels is None:
        return None
    if not uses_labels:
        raise ValueError("labels were given but the model is unconditional and there is no classifier")
    if isinstance(labels, th.Tensor):
        labels = labels.detach().cpu()  # numpy refuses GPU tensors
    labels = th.as_tensor(np.asarray(labels)).long().reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels range from {int(labels.min())} to {int(labels.max())}: expected class ids in "
            f"[0, {num_classes - 1}]"
        )
    return labels

