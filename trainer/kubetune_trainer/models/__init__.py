"""Model families: each diffusers pipeline class the trainer supports is one entry of `registry.FAMILIES`.

`family` defines what an entry provides (`ModelFamily`) and what it builds (`Components`);
`unet_family` holds what the UNet latent-diffusion families share (loading, the VAE's latent
space, the DDPM objective in `ddpm`), `sd` and `sdxl` are the entries, and `pipelines` rebuilds
a diffusers pipeline around trained components for sampling and export.
"""
