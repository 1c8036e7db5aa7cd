"""
The quickstart's judge: a one-hidden-layer MLP fitted on the real training images,
area-downsampled to judge_size x judge_size. It says which class an image shows, and its
hidden-layer features are where precision and recall (k = NEIGHBOURS, Kynkaanniemi et
al. 2019) compare samples with the held-out real images, as the evaluator does with
Inception's.
"""

import warnings

import numpy as np
import torch as th
import torch.nn.functional as F

from evaluations.manifold import ManifoldEstimator

NEIGHBOURS = 3  # k of precision and recall, as the evaluator's


def judge_inputs(images, judge_size):
    """
    :param images: uint8 images [N x H x W x C].
    :return: float32 [N x judge_size * judge_size * C]: the images area-downsampled to
        judge_size x judge_size, in [0, 1].
    """
    pixels = th.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return F.adaptive_avg_pool2d(pixels, judge_size).flatten(1).numpy()


class Judge:
    """
    A one-hidden-layer MLP on downsampled images, fitted on real images: it says which
    class an image shows and gives the features precision and recall are measured in.
    """

    def __init__(self, judge_size, hidden=64, seed=0):
        """
        :param judge_size: the side images are downsampled to.
        :param hidden: hidden units (the feature dimension).
        :param seed: seed of the MLP's initialisation and batches.
        """
        from sklearn.neural_network import MLPClassifier

        self.judge_size = judge_size
        self.mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=400, random_state=seed)

    def fit(self, images, labels):
        """
        :param images: uint8 real images [N x H x W x C] of the given classes.
        :return: self.
        """
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        # One BLAS thread: the problem is tiny, and several threads stall on a busy machine.
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.mlp.fit(judge_inputs(images, self.judge_size), labels)
        return self

    def predict(self, images):
        """:return: the judged class of each image."""
        return self.mlp.predict(judge_inputs(images, self.judge_size))

    def features(self, images):
        """:return: float [N x hidden]: the images' hidden-layer activations (ReLU)."""
        hidden = judge_inputs(images, self.judge_size) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0]
        return np.maximum(hidden, 0)


def precision_recall(real_features, sample_features):
    """
    Improved precision and recall (k = NEIGHBOURS), computed as the evaluator does.

    :return: (precision, recall): the fraction of samples inside the real manifold and
        the fraction of real images inside the sample manifold.
    """
    estimator = ManifoldEstimator(nhood_sizes=(NEIGHBOURS,))
    real_radii = estimator.manifold_radii(real_features)
    sample_radii = estimator.manifold_radii(sample_features)
    precision, recall = estimator.evaluate_pr(real_features, real_radii, sample_features, sample_radii)
    return float(precision[0]), float(recall[0])


def score_images(judge, real_features, images, labels):
    """
    :return: a dict: 'recognised' (the fraction the judge assigns to labels), 'precision'
        and 'recall' against the real features.
    """
    precision, recall = precision_recall(real_features, judge.features(images))
    recognised = float(np.mean(judge.predict(images) == labels))
    return dict(recognised=recognised, precision=precision, recall=recall)
