"""The refiners plugin of refiners-sam (entry point `sam = refiners_sam.plugin`).

It registers nothing yet: the Segment Anything model will be registered here, through the hooks of
`refiners_core.plugins.hookspecs`, when it is added to this package.
"""
