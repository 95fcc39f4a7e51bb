"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class Sad3Error(Exception):
    """A problem with the user's input: the message names it and says what to do."""
