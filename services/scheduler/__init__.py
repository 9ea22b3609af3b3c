"""cronclock: the HTTP cron-clock daemon."""

__version__ = "0.1.0"


def cli() -> int:
    """The `cronclock` console script: signal handlers first, then the (slower) rest."""
    from .signals import ProcessSignals

    signals = ProcessSignals.install()
    from .__main__ import main

    return main(signals=signals)
