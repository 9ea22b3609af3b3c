class ScheduleError(ValueError):
    """A schedule text, time zone or argument that cannot be used.

    The message quotes the offending value and says what is accepted.
    """
