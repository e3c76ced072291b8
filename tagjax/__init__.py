"""tagjax: weakly supervised image pretraining from hashtags, in JAX/Flax.

The data flows one way, one module per stage::

    posts -> hashtags/vocab -> build (records) -> input_pipeline -> train -> checkpoint -> evaluate/transfer
"""

__version__ = "0.1.0"
