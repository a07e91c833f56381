"""CLI sub-commands, one module each. A module here defines

    NAME: str                      the sub-command (``fedmerge NAME ...``)
    HELP: str                      one line for ``fedmerge --help``
    def add_arguments(parser) -> None
    def run(args) -> int

and is discovered automatically by :mod:`fedmerge.cli`.
"""
