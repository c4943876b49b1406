"""The refiners plugin of refiners-sdxl (entry point `sdxl = refiners_sdxl.plugin`).

It registers nothing yet: the `sdxl` model is registered here once `StableDiffusion_XL` (text encoders, UNet,
autoencoder and pipelines) exists; today the package offers the SDXL UNet alone (`refiners_sdxl.SDXLUNet`).
"""
