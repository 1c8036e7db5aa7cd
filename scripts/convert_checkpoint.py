"""
Convert a checkpoint between .pt and .safetensors (chosen by the output's extension),
tensors bit-identical; the record this library keeps in a .json sidecar (flags, step)
goes into the safetensors metadata, and comes back out into a .json sidecar.

python scripts/convert_checkpoint.py models/256x256_diffusion.pt models/256x256_diffusion.safetensors
python scripts/convert_checkpoint.py runs/x/model010000.safetensors runs/y/model010000.pt
"""

import argparse
import os

import blobfile as bf

from guided_diffusion.checkpoint import SAFETENSORS_SUFFIX, read_sidecar, read_state_dict
from guided_diffusion.command_line import run_script
from guided_diffusion.training_state import save_checkpoint


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if not args.output.endswith((".pt", SAFETENSORS_SUFFIX)):
        raise ValueError(f"output {args.output!r}: expected a name ending in .pt or {SAFETENSORS_SUFFIX}")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError(f"input and output are the same file ({args.input}): choose another output")
    if bf.exists(args.output) and not args.overwrite:
        raise ValueError(f"output {args.output!r} exists: pass --overwrite to replace it")
    state = read_state_dict(args.input)
    if bf.dirname(args.output):
        bf.makedirs(bf.dirname(args.output))
    save_checkpoint(args.output, state, read_sidecar(args.input))
    print(f"wrote {len(state)} tensors to {args.output}")


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("input", help="a .pt or .safetensors checkpoint")
    parser.add_argument("output", help="the converted file: .pt or .safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


if __name__ == "__main__":
    run_script(main, create_argparser())
