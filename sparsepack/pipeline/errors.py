"""Errors a pipeline run can end in that are not about a file (those are ``formats.errors``); kept light so the
CLI can catch them without importing the training code."""


class TrainingDivergedError(RuntimeError):
    """The loss or a trained parameter became NaN or infinite; the last good checkpoint is kept."""
