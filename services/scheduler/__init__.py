"""cronclock: the HTTP cron-clock daemon."""

__version__ = "0.1.0"


def cli() -> int:
    """The `cronclock` console script: signal handlers first, then the (slower) rest."""
    import sys

    if sys.argv[1:] == ["--version"]:  # answered before the slow imports (bench/startup.py)
        sys.stdout.write(f"cronclock {__version__}\n")
        return 0
    from .signals import ProcessSignals

    signals = ProcessSignals.install()
    from .__main__ import main

    return main(signals=signals)
