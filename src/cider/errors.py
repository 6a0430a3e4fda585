"""Exceptions raised by cider: each message says what was wrong, where, and what to do."""


class CiderError(ValueError):
    """Base class for every input or configuration error raised by cider."""


class ImageError(CiderError):
    """The image (or tile) cannot be restored as given."""


class PsfError(CiderError):
    """The point-spread function is invalid or does not fit the image."""
