"""``python -m search`` runs the ``hwprune`` command line (used to spawn parallel workers)."""

from search.cli.main import main

main()
