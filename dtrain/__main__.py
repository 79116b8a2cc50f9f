"""`python -m dtrain`: the `dtrain` command."""

from dtrain.commands.main import main

main()
