"""
Classes without labels: image features from a diffusion model's own UNet, k-means on
features, and how well clusters agree with true classes (purity, normalised mutual
information). The clusters stand in for classes in classifier and classifier-free
guidance (scripts/cluster_labels.py writes them as a labels file).
"""

import numpy as np
import torch as th


def middle_block_features(model, x_t, timesteps):
    """
    The UNet's middle block output for noised images, mean-pooled over space: one
    feature vector per image (Baranchuk et al. 2022 read a diffusion UNet's
    activations at a small timestep as semantic features).

    :param model: a unet.UNetModel without class conditioning.
    :param x_t: a [N x C x H x W] batch of noised images.
    :param timesteps: the N timesteps of the model's diffusion.
    :return: a float32 [N x channels] tensor.
    """
    captured = []
    hook = model.middle_block.register_forward_hook(lambda _module, _inputs, h: captured.append(h))
    try:
        with th.no_grad():
            model(x_t, timesteps)
    finally:
        hook.remove()
    return captured[0].float().mean(dim=(2, 3))


def kmeans_labels(features, num_clusters, seed=0, batch_size=1024):
    """
    Cluster feature vectors with mini-batch k-means (Sculley 2010; scikit-learn's
    MiniBatchKMeans, k-means++ starts, the best of 3).

    :param features: a float [N x D] array, one row per image.
    :param num_clusters: the number of clusters, from 2 to N.
    :param seed: seed of the starts and the mini-batches.
    :param batch_size: rows per k-means mini-batch.
    :return: an int64 array of N cluster indices in [0, num_clusters).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or not len(features):
        raise ValueError(f"features of shape {features.shape}: expected [N x D] with N > 0")
    if not np.isfinite(features).all():
        raise ValueError("features hold NaN or inf values: k-means needs finite features")
    if not 2 <= num_clusters <= len(features):
        raise ValueError(f"num_clusters={num_clusters}: expected 2 to {len(features)} (the number "
                         "of images); guidance needs at least two classes")
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError:
        raise ImportError("k-means needs scikit-learn: pip install scikit-learn") from None
    kmeans = MiniBatchKMeans(n_clusters=num_clusters, random_state=seed, n_init=3,
                             batch_size=batch_size)
    return kmeans.fit_predict(features).astype(np.int64)


def contingency_table(true_labels, cluster_labels):
    """
    :param true_labels: N class labels (any hashable values).
    :param cluster_labels: N cluster labels.
    :return: an int64 [classes x clusters] array of counts.
    """
    if len(true_labels) != len(cluster_labels) or not len(true_labels):
        raise ValueError(f"{len(true_labels)} true labels and {len(cluster_labels)} cluster labels: "
                         "expected the same positive number")
    _, true_index = np.unique(np.asarray(true_labels), return_inverse=True)
    _, cluster_index = np.unique(np.asarray(cluster_labels), return_inverse=True)
    table = np.zeros((true_index.max() + 1, cluster_index.max() + 1), dtype=np.int64)
    np.add.at(table, (true_index.ravel(), cluster_index.ravel()), 1)
    return table


def purity(true_labels, cluster_labels):
    """
    The fraction of images whose class is their cluster's most common class.

    :param true_labels: N class labels.
    :param cluster_labels: N cluster labels.
    :return: a float in (0, 1].
    """
    table = contingency_table(true_labels, cluster_labels)
    return float(table.max(axis=0).sum() / table.sum())


def normalized_mutual_information(true_labels, cluster_labels):
    """
    I(classes; clusters) / ((H(classes) + H(clusters)) / 2): scikit-learn's
    normalized_mutual_info_score (arithmetic-mean normalisation).

    :param true_labels: N class labels.
    :param cluster_labels: N cluster labels.
    :return: a float in [0, 1].
    """
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(true_labels, cluster_labels))
