"""Command-line tools around the data path: the local broker, replay, tail, and run (all of it on one machine)."""
