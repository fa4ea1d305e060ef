"""The module's error for problems a user can fix (shown as a message, not a traceback)."""


class ModuleError(Exception):
    """A problem with the user's input or environment, worded for the user (names the node or file)."""


class PreviousTrainingError(ModuleError):
    """The output folder holds an earlier training: resume it, overwrite it, or use another folder."""
