"""`python -m abliterate` runs the command line."""

from .cli import main

main()
