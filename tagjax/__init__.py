"""tagjax: weakly supervised image pretraining from hashtags, in JAX/Flax.

The data flows one way, one library module per stage::

    posts -> hashtags/vocab -> build (records) -> input_pipeline -> train -> checkpoint -> evaluate/transfer

Three layers, each importing only the layers below it (tests/test_layout.py checks the import graph for
cycles and for library modules reaching up):

* **library** -- every module of tagjax except the two below: the stages above and what they share
  (build_steps and eval_sets for both builders; inference, metrics, decontaminate, downstream and
  emoji_dataset for everything that runs a checkpoint or reads a downstream dataset; models, sharding,
  optim, losses, ...). Library modules import what they use at the top.
* **commands** -- tagjax.commands: one thin module per subcommand, ``add_arguments(parser)`` and
  ``run(args)``, calling the library (imported inside ``run``, so ``--help`` stays fast).
* **entry points** -- tagjax.cli (the ``tagjax`` program: the registry of commands) and the
  ``tagjax`` console script that calls it.
"""

__version__ = "0.1.0"
