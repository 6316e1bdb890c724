"""The one exception type users see: a problem with their input, worded with what to do about it."""


class UsageError(ValueError):
    """Bad input (a word not in the prompt, a layer that does not exist, ...). The CLI prints it without a traceback.

        try:
            attnctl.Regulation(targets=[])
        except attnctl.UsageError as err:
            print(err)          # targets is empty: name at least one word of the prompt, ...
    """


class BrokenImage(UsageError):
    """The settings made the pipeline produce something that is not an image (non-finite values, which would be
    saved as black); the CLI exits with status 3 and writes nothing."""
