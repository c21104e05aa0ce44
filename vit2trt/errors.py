"""Errors that end a command with exit code 2 and one message (no traceback unless --debug)."""


class Vit2TrtError(Exception):
    """A problem with the user's input or environment, explained in one message."""


class BadModelFileError(Vit2TrtError):
    """The file is missing, not ONNX, truncated, or its external data is missing."""


class NotAViTError(Vit2TrtError):
    """A readable ONNX graph in which no Vision Transformer could be found."""


class ExportError(Vit2TrtError):
    """A model could not be built or exported as asked."""
