"""
The quickstart: train a small class-conditional ADM and a noised classifier on the
8x8 handwritten digits that ship with scikit-learn, sample with classifier guidance at
several scales and measure the fidelity-diversity trade-off, on a CPU in minutes.

python scripts/quickstart.py                               # writes runs/quickstart/
python scripts/quickstart.py --data_dir DIR --heldout_dir HELDOUT --image_size 32 \\
    --out_dir runs/mine                                    # your own labelled images
"""

import argparse

from guided_diffusion.quickstart import quickstart_defaults, run_quickstart
from guided_diffusion.script_util import add_dict_to_argparser


def main(argv=None):
    run_quickstart(**vars(create_argparser().parse_args(argv)))


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, quickstart_defaults())
    return parser


if __name__ == "__main__":
    main()
