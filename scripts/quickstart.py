"""
The quickstart: train a small class-conditional ADM and a noised classifier on the
8x8 handwritten digits that ship with scikit-learn, sample with classifier guidance at
several scales and measure the fidelity-diversity trade-off, on a CPU in minutes.

python scripts/quickstart.py                               # writes runs/quickstart/
python scripts/quickstart.py --unlabeled True              # also guidance without labels
python scripts/quickstart.py --data_dir DIR --heldout_dir HELDOUT --image_size 32 \\
    --out_dir runs/mine                                    # your own labelled images
"""

import argparse
import sys
from pathlib import Path

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/ lives beside scripts/

from examples.quickstart.pipeline import quickstart_defaults, run_quickstart  # noqa: E402
from guided_diffusion.command_line import run_script  # noqa: E402
from guided_diffusion.script_util import add_dict_to_argparser  # noqa: E402


def main(argv=None):
    options = vars(create_argparser().parse_args(argv))
    threads = options.pop("threads")
    if threads > 0:
        th.set_num_threads(threads)
    run_quickstart(**options)


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, quickstart_defaults())
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (0: one per core). One thread is slower on an idle machine but "
        "does not stall when other programs use the cores.",
    )
    return parser


if __name__ == "__main__":
    run_script(main, create_argparser())
