"""The ``linft`` command group (installed as ``linft.cli``): argument parsing and printing only."""
