"""``python -m saffron.cli``: the same as the ``saffron`` command."""

from saffron.cli import main

main()
