"""
Device choice and float32 precision for the evaluator's computations.
"""

from contextlib import contextmanager

import torch


def default_device(device=None):
    """
    :param device: a device name or torch.device, or None.
    :return: that device, else CUDA when available, else the CPU.
    """
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def full_fp32_precision():
    """
    Turn off TF32 in cuDNN convolutions and cuBLAS matrix products inside the block (the
    original evaluator ran in true float32), restoring the previous settings after it.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
