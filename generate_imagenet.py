"""Relay Diffusion sampling with the paper's ImageNet 256x256 settings (FID 1.87).

The same command as generate.py (every option is there); only the defaults differ: those of the
reference generate_imagenet.py, kept as data in training.pipeline.PRESETS['imagenet'] (256 Heun steps with
churn for the first stage; 200 steps at rho 100, guidance 3.5 for the relay; saved images
brightened by 1.06 as the reference does, `--postprocess=none` turns that off).

  torchrun --standalone --nproc_per_node=8 generate_imagenet.py --outdir=generations/imagenet \\
      --network_first=ckpts/imagenet_first_stage.pkl --network_second=ckpts/imagenet_second_stage.pt
"""

import generate

main = generate.make_command('imagenet', help=__doc__)

if __name__ == '__main__':
    main()
