"""CLI subcommands of the online side, one module per area."""
