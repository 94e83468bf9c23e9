"""The `punchline` command: every role and user action is a subcommand."""
