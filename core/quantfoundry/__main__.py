"""``python -m quantfoundry``: the ``qf`` command line."""

from .cli import main

main()
