"""Relay Diffusion sampling with the paper's CelebA-HQ 256x256 settings (FID 3.15).

The same command as generate.py (every option is there); only the defaults differ: those of the
reference generate_celebahq.py, kept as data in training.pipeline.PRESETS['celebahq'] (120-step stochastic
Heun with sde_scale 0.05 for the first stage; 150 steps, blur sigma 2, truncation 0.95 / 1.05 and
the churn step for the relay; saved images get contrast 0.9, brightness 1.05 and colour 0.99 as
the reference does, `--postprocess=none` turns that off).

  torchrun --standalone --nproc_per_node=8 generate_celebahq.py --outdir=generations/celebahq \\
      --network_first=ckpts/celebahq_first_stage.pt --network_second=ckpts/celebahq_second_stage.pt
"""

import generate

main = generate.make_command('celebahq', help=__doc__)

if __name__ == '__main__':
    main()
