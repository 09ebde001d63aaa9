"""One module per ``tessera`` subcommand; each defines ``register(subparsers)``."""
