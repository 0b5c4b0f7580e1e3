"""User-facing errors: the CLI prints the message (no traceback) and exits non-zero."""


class MgsError(Exception):
    """A problem with the user's input or environment; the message names the file and the fix."""


class InputError(MgsError):
    """Bad or missing input data (images, COLMAP models, configs)."""


class TrainingError(MgsError):
    """Training cannot continue (e.g. non-finite loss); the last good checkpoint is kept."""


class StopRequested(MgsError):
    """Training was asked to stop (SIGTERM) and saved a checkpoint to resume from."""
