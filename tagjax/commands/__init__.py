"""The ``tagjax`` subcommands: each module's ``add_arguments(parser)`` and ``run(args) -> int``, thin
wrappers that parse, load a config and call the library. The library never imports them."""
