"""cronclock: the HTTP cron-clock daemon."""

__version__ = "0.1.0"
