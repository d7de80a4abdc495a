"""Model families: each diffusers pipeline class the trainer supports is one entry of `registry.FAMILIES`.

`family` defines what an entry provides (`ModelFamily`) and what it builds (`Components`), and
`latent_space` what every entry here shares (the text cache, the VAE's latent space). Each
module here that defines `FAMILY` is an entry: `sd` and `sdxl` on what the UNet families share
(`unet_family`, with the DDPM objective in `ddpm`); `sd3`, `flux` and `z_image` on what the
flow-matching transformers share (`transformer_family`, the objective in `flow`). `pipelines`
rebuilds a diffusers pipeline around trained components for sampling and export.
"""
