"""`python -m refiners_core.cli ...`: the `refiners` command, for launchers that run a module (`torchrun -m`)."""

from refiners_core.cli import main

raise SystemExit(main())
