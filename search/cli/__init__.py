"""The ``hwprune`` command line: a thin layer over the packages below it.

``_app`` holds the Typer application, shared options and the error contract (exit status 2 for bad
input, 1 for failures at run time); each other module adds one command group; ``main`` imports them
all and runs the application.
"""
