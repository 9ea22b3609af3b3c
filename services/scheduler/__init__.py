"""cronclock: the HTTP cron-clock daemon."""

__version__ = "0.1.0"


def answered_version() -> bool:
    """`--version` alone is answered before the slow imports (bench/startup.py)."""
    import sys

    if sys.argv[1:] != ["--version"]:
        return False
    sys.stdout.write(f"cronclock {__version__}\n")
    return True


def cli() -> int:
    """The `cronclock` console script: signal handlers first, then the (slower) rest."""
    if answered_version():
        return 0
    from .signals import ProcessSignals

    signals = ProcessSignals.install()
    from .__main__ import main

    return main(signals=signals)
