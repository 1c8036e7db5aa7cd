"""
The options of a Gaussian diffusion: what the model predicts (ModelMeanType), where
the reverse process's variance comes from (ModelVarType) and the training objective
(LossType).

They sit below every module that reads them (gaussian_diffusion, solvers);
gaussian_diffusion re-exports them, so gaussian_diffusion.ModelVarType is this
module's ModelVarType, as in the original code.
"""

import enum


class ModelMeanType(enum.Enum):
    """
    What the model's (first C) output channels predict.
    """

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise epsilon


class ModelVarType(enum.Enum):
    """
    Where the variance of p(x_{t-1} | x_t) comes from.

    LEARNED: the model outputs the log-variance. LEARNED_RANGE: the model
    outputs v in [-1, 1] interpolating the log-variance between the posterior
    variance (FIXED_SMALL) and beta_t (FIXED_LARGE).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()

    def is_learned(self):
        """
        :return: True when the model outputs variance channels (LEARNED, LEARNED_RANGE).
        """
        return self in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


class LossType(enum.Enum):
    """
    The training objective.
    """

    MSE = enum.auto()  # MSE on the mean prediction, plus the VLB if variances are learned
    RESCALED_MSE = enum.auto()  # as MSE, the VLB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational lower bound term for the sampled t
    RESCALED_KL = enum.auto()  # as KL, scaled by num_timesteps to estimate the full VLB

    def is_vb(self):
        """
        :return: True for the variational-bound losses (KL, RESCALED_KL).
        """
        return self in (LossType.KL, LossType.RESCALED_KL)
