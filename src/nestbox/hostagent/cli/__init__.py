"""`nestbox-agent`'s operator subcommands (image build/show, doctor): one module each, each
exposing `add_parser(subparsers)` that registers its commands with a `func(args, settings)`."""
