"""The FreeU factors recommended per model: light constants, read when the plugin registers (without torch)."""

SD15_SCALES = {"s1": 0.9, "s2": 0.2, "b1": 1.2, "b2": 1.4}
"""The FreeU factors the authors recommend for Stable Diffusion 1.x."""
SDXL_SCALES = {"s1": 0.9, "s2": 0.2, "b1": 1.3, "b2": 1.4}
"""The FreeU factors the authors recommend for SDXL (FreeU's README, diffusers' FreeU guide)."""
