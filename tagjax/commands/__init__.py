"""The command layer: one module per ``tagjax`` subcommand (registered in tagjax.cli).

Each module holds only its arguments, ``add_arguments(parser)``, and ``run(args) -> int | None``, which
calls library modules. Command modules import heavy libraries (JAX, grain, the models, the builders)
inside ``run``, so ``tagjax X --help`` stays fast. The library never imports this package.
"""
