"""Training-side subcommands (train, export); filled in by the trainer."""
