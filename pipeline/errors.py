"""The one exception type the command line turns into a clean one-line error."""


class PipelineError(Exception):
    """A problem with the user's input or environment, stated so they can fix it.

    The message names the setting or file, the value received, what is allowed and
    what to do; the CLI prints it without a traceback and exits with status 2.
    """
