"""One module a command of `cada`: `arguments(parser)` adds its arguments, `run(args)` runs it (see cli.COMMANDS)."""
