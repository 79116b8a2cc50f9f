"""`python -m dtrain`: the `dtrain` command (what `torchrun -m dtrain` and the launchers run)."""

from dtrain.commands.main import main

if __name__ == "__main__":
    main()
