"""The refiners plugin of refiners-sd15 (entry point `sd15 = refiners_sd15.plugin`).

It registers nothing yet: the SD1.5 models, solvers and the `refiners generate` command will be registered
here, through the hooks of `refiners_core.plugins.hookspecs`, as they are added to this package.
"""
