"""The project's experiment configs, shipped with the package so they resolve by name anywhere.

``tagjax train --config tiny`` loads ``tiny.py`` from here, from a checkout or an installed wheel alike
(a checkout also shows this folder as the top-level ``configs/``). A config file of one's own, anywhere,
starts from the shared defaults with ``from tagjax.configs import default`` (see ``default.py``).
Modules starting with ``_`` are helpers shared by several configs, not configs themselves.
"""
