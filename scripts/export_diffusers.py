"""
Export a diffusion model to Hugging Face diffusers: OUT_DIR/unet (UNet2DModel),
OUT_DIR/scheduler (DDPMScheduler with the model's betas over its full process) and
OUT_DIR/model_index.json (DDPMPipeline.from_pretrained(OUT_DIR) loads both).

python scripts/export_diffusers.py --config 256x256_diffusion_uncond --model_path models/256x256_diffusion_uncond.pt --out_dir exported
python scripts/export_diffusers.py $MODEL_FLAGS --model_path MODEL.pt --out_dir exported
"""

import argparse
import os

from guided_diffusion import command_line, script_util
from guided_diffusion.diffusers_export import PIPELINE_INDEX, export_to_diffusers


def main(argv=None):
    args = command_line.parse_args_with_config(create_argparser(), purpose="train", argv=argv)
    if not args.out_dir:
        raise ValueError("--out_dir is empty: pass the folder to write the diffusers pipeline into")
    if args.timestep_respacing:
        print(f"--timestep_respacing {args.timestep_respacing} is not exported: the scheduler gets "
              "the full process (diffusers respaces it with num_inference_steps)")
    model, diffusion = command_line.load_model_and_diffusion(
        args, script_util.create_model_and_diffusion, script_util.model_and_diffusion_defaults(), ""
    )
    unet_dir, scheduler_dir = export_to_diffusers(model, diffusion, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {unet_dir}, {scheduler_dir} and {os.path.join(args.out_dir, PIPELINE_INDEX)}")


def create_argparser():
    defaults = dict(script_util.model_and_diffusion_defaults(), model_path="", out_dir="", overwrite=False)
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    script_util.add_dict_to_argparser(parser, defaults)
    # What load_model_and_diffusion reads besides the model flags.
    parser.set_defaults(channels_last=False, fast_attention=True)
    return parser


if __name__ == "__main__":
    command_line.run_script(main, create_argparser())
