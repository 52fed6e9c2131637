"""One module per `stream-mf` sub-command: `add_parser(subparsers)` and `run(args) -> int`."""
