"""
Improved precision and recall (Kynkaanniemi et al. 2019) as the original evaluator computes
them: each set's manifold is the union of balls reaching each point's k-th nearest
neighbour; precision is the fraction of samples inside the reference manifold, recall the
fraction of references inside the sample manifold. Distances are squared Euclidean,
computed in float16 first and again in float32 when any float16 value is not finite.
"""

import numpy as np
import torch

from evaluations.device_util import full_fp32_precision


def _as_tensor(array, device):
    """A float32 tensor on device from an array-like."""
    return torch.as_tensor(np.asarray(array, dtype=np.float32), device=device)


def _squared_distances(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) for all row pairs, in the dtype of u and v."""
    norm_u = (u * u).float().sum(dim=1).to(u.dtype)
    norm_v = (v * v).float().sum(dim=1).to(v.dtype)
    dots = (u.float() @ v.float().T).to(u.dtype)
    return torch.clamp(norm_u[:, None] - 2 * dots + norm_v[None, :], min=0)


class DistanceBlock:
    """Pairwise squared distances between two blocks of feature vectors."""

    def __init__(self, device="cpu"):
        """
        :param device: the torch device to compute on.
        """
        self.device = torch.device(device)

    def distances(self, u, v):
        """
        Squared distances in float16 (inputs, products and sums rounded to float16, dot
        products accumulated in float32), or in float32 when any float16 one is not finite.

        :param u: an [N x D] float32 tensor on self.device.
        :param v: an [M x D] float32 tensor on self.device.
        :return: an [N x M] float32 tensor.
        """
        with full_fp32_precision():
            half = _squared_distances(u.half(), v.half())
            if torch.isfinite(half).all():
                return half.float()
            return _squared_distances(u, v)

    def pairwise_distances(self, U, V):
        """
        :param U: an [N x D] array.
        :param V: an [M x D] array.
        :return: an [N x M] float32 numpy array of squared distances.
        """
        return self.distances(_as_tensor(U, self.device), _as_tensor(V, self.device)).cpu().numpy()

    def less_thans(self, batch_1, radii_1, batch_2, radii_2):
        """
        Which points of each batch lie inside some ball of the other batch.

        :param batch_1: [N x D] features.
        :param radii_1: [N x K1] squared radii of batch_1's balls.
        :param batch_2: [M x D] features.
        :param radii_2: [M x K2] squared radii of batch_2's balls.
        :return: ([N x K2] bool array, [M x K1] bool array).
        """
        batch_1, batch_2, radii_1, radii_2 = (
            _as_tensor(x, self.device) for x in (batch_1, batch_2, radii_1, radii_2)
        )
        batch_1_in, batch_2_in = self.inside(self.distances(batch_1, batch_2), radii_1, radii_2)
        return batch_1_in.cpu().numpy(), batch_2_in.cpu().numpy()

    @staticmethod
    def inside(distances, radii_1, radii_2):
        """
        Ball membership from a block of distances.

        :param distances: [N x M] squared distances between rows and columns.
        :param radii_1: [N x K1] squared radii of the rows' balls.
        :param radii_2: [M x K2] squared radii of the columns' balls.
        :return: ([N x K2] rows inside some column's ball, [M x K1] columns inside some
                 row's ball), bool tensors.
        """
        rows_in = torch.stack([(distances <= r[None, :]).any(dim=1) for r in radii_2.T], dim=1)
        cols_in = torch.stack([(distances <= r[:, None]).any(dim=0) for r in radii_1.T], dim=1)
        return rows_in, cols_in


class ManifoldEstimator:
    """k-nearest-neighbour manifolds of feature vectors, compared block by block."""

    def __init__(
        self,
        device="cpu",  # torch device for the distance computations
        row_batch_size=10000,  # rows per distance block (memory/speed trade-off)
        col_batch_size=10000,  # columns per distance block
        nhood_sizes=(3,),  # the k of each manifold estimate
        clamp_to_percentile=None,  # zero radii above this percentile, or None
        eps=1e-5,  # added to distances in the realism score
    ):
        self.distance_block = DistanceBlock(device)
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def _blocks(self, count, size):
        """(start, end) of consecutive blocks of at most size rows out of count."""
        return [(start, min(start + size, count)) for start in range(0, count, size)]

    def manifold_radii(self, features):
        """
        The squared distance from each vector to its k-th nearest neighbour in the set
        (the vector itself, at distance 0, is neighbour 0).

        :param features: an [N x D] array.
        :return: an [N x len(nhood_sizes)] float32 array.
        """
        k_max = max(self.nhood_sizes)
        if len(features) <= k_max:
            raise ValueError(
                f"precision/recall needs more than k={k_max} feature vectors per set, "
                f"got {len(features)}"
            )
        feats = _as_tensor(features, self.distance_block.device)
        radii = []
        for row_start, row_end in self._blocks(len(feats), self.row_batch_size):
            nearest = None  # the k_max + 1 smallest distances so far, ascending
            for col_start, col_end in self._blocks(len(feats), self.col_batch_size):
                rows, cols = feats[row_start:row_end], feats[col_start:col_end]
                block = self.distance_block.distances(rows, cols)
                candidates = block if nearest is None else torch.cat([nearest, block], dim=1)
                keep = min(k_max + 1, candidates.shape[1])
                nearest = torch.topk(candidates, keep, dim=1, largest=False, sorted=True).values
            radii.append(nearest[:, self.nhood_sizes].cpu().numpy())
        radii = np.concatenate(radii, axis=0).astype(np.float32)
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate(self, features, radii, eval_features):
        """
        Whether new vectors lie on a manifold, with their realism scores.

        :param features: [N x D] vectors that define the manifold.
        :param radii: [N x K] their squared radii (manifold_radii).
        :param eval_features: [M x D] vectors to test.
        :return: a dict: 'fraction' (float, for the first k), 'batch_predictions' ([M x K]
                 int32), 'max_realisim_score' ([M] float32; the original's spelling) and
                 'nearest_indices' ([M] int32).
        """
        ref, ref_radii, evals = (
            _as_tensor(x, self.distance_block.device) for x in (features, radii, eval_features)
        )
        predictions, realism, nearest = [], [], []
        for row_start, row_end in self._blocks(len(evals), self.row_batch_size):
            inside = best_ratio = best_distance = best_index = None
            for col_start, col_end in self._blocks(len(ref), self.col_batch_size):
                rows, cols = evals[row_start:row_end], ref[col_start:col_end]
                block = self.distance_block.distances(rows, cols)
                block_radii = ref_radii[col_start:col_end]
                block_inside = (block[:, :, None] <= block_radii[None]).any(dim=1)
                ratio = (block_radii[None, :, 0] / (block + self.eps)).max(dim=1).values
                distance, index = block.min(dim=1)
                if inside is None:
                    inside, best_ratio = block_inside, ratio
                    best_distance, best_index = distance, index
                    continue
                inside |= block_inside
                best_ratio = torch.maximum(best_ratio, ratio)
                closer = distance < best_distance  # ties keep the earlier index, like argmin
                best_index = torch.where(closer, index + col_start, best_index)
                best_distance = torch.where(closer, distance, best_distance)
            predictions.append(inside.int().cpu().numpy())
            realism.append(best_ratio.cpu().numpy())
            nearest.append(best_index.int().cpu().numpy())
        predictions = np.concatenate(predictions, axis=0)
        return {
            "fraction": float(np.mean(predictions)),
            "batch_predictions": predictions,
            "max_realisim_score": np.concatenate(realism).astype(np.float32),
            "nearest_indices": np.concatenate(nearest),
        }

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        """
        Precision and recall of two sets at once.

        :param features_1: [N1 x D] reference vectors.
        :param radii_1: [N1 x K1] their squared radii.
        :param features_2: [N2 x D] sample vectors.
        :param radii_2: [N2 x K2] their squared radii.
        :return: (precision, recall): a [K1] array (fraction of samples inside the
                 reference manifold) and a [K2] array (fraction of references inside the
                 sample manifold).
        """
        block = self.distance_block
        feats_1, feats_2, radii_1, radii_2 = (
            _as_tensor(x, block.device) for x in (features_1, features_2, radii_1, radii_2)
        )
        # References inside the sample manifold (recall), samples inside the reference one.
        flags = dict(dtype=torch.bool, device=block.device)
        status_1 = torch.zeros(len(feats_1), radii_2.shape[1], **flags)
        status_2 = torch.zeros(len(feats_2), radii_1.shape[1], **flags)
        for start_1, end_1 in self._blocks(len(feats_1), self.row_batch_size):
            for start_2, end_2 in self._blocks(len(feats_2), self.col_batch_size):
                distances = block.distances(feats_1[start_1:end_1], feats_2[start_2:end_2])
                in_1, in_2 = block.inside(distances, radii_1[start_1:end_1], radii_2[start_2:end_2])
                status_1[start_1:end_1] |= in_1
                status_2[start_2:end_2] |= in_2
        precision = status_2.double().mean(dim=0).cpu().numpy()
        recall = status_1.double().mean(dim=0).cpu().numpy()
        return precision, recall
