"""`python -m numprotect.cli`: the same as the `numprotect` console script."""

from numprotect.cli.main import main

main()
