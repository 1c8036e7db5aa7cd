"""
Checks of the network flags that the factories in script_util.py run before building,
so that a bad value is named in flag terms instead of failing deep in a constructor.
"""

# Channels per attention head of the classifier (the released classifiers'; no flag sets it).
CLASSIFIER_HEAD_CHANNELS = 64


def check_image_size(image_size):
    """
    :param image_size: side of the images; raises a ValueError unless it is positive.
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size}: expected a positive number of pixels")


def check_classifier_width(classifier_width, classifier_depth, channel_mult, attention_rates):
    """
    Raise a ValueError naming classifier_width when an attention layer of the classifier
    would get a width that is not a multiple of CLASSIFIER_HEAD_CHANNELS: the levels at
    attention_rates (when they have blocks) and the middle block, which always has one
    (at the last level's width, or the first's without blocks).

    :param classifier_width: the base channel count.
    :param classifier_depth: residual blocks per level.
    :param channel_mult: the multiplier of each level.
    :param attention_rates: the downsampling rates with attention.
    """
    levels = [
        (f"level {level} (x{mult})", mult)
        for level, mult in enumerate(channel_mult)
        if classifier_depth > 0 and 2**level in attention_rates
    ]
    middle_mult = channel_mult[-1] if classifier_depth > 0 else channel_mult[0]
    levels.append((f"the middle block (x{middle_mult})", middle_mult))
    bad = [
        f"{where}: {int(mult * classifier_width)}"
        for where, mult in levels
        if int(mult * classifier_width) % CLASSIFIER_HEAD_CHANNELS
    ]
    if bad:
        raise ValueError(
            f"classifier_width={classifier_width}: the classifier's attention uses "
            f"{CLASSIFIER_HEAD_CHANNELS} channels per head, so classifier_width times the "
            f"channel multiplier of every level with attention must be a multiple of "
            f"{CLASSIFIER_HEAD_CHANNELS}, but {'; '.join(bad)}. Use a classifier_width that "
            f"is a multiple of {CLASSIFIER_HEAD_CHANNELS}, or other "
            "classifier_attention_resolutions"
        )
