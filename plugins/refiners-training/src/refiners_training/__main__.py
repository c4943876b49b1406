"""`python -m refiners_training lora CONFIG.toml [--resume]`, the same as `refiners train lora ...`; for torchrun:

torchrun --nproc_per_node=2 -m refiners_training lora my-lora.toml
"""

import sys

from refiners_core.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
