"""`python -m abliterate` runs the command line."""

from abliterate.cli.main import main

main()
