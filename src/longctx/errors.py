"""The one exception type for mistakes a user can make (bad config, missing file, ...).

The command line prints its message as one sentence and exits non-zero, without a traceback.
"""


class LongctxError(Exception):
    """A user-caused error whose message says what is wrong and what to do."""
