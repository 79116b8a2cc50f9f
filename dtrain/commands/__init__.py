"""The `dtrain` command line (`main`), one module per command."""
