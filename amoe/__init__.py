"""The `amoe` command line. Each package owns its subcommands; this only dispatches."""
__version__ = "0.1.0"
