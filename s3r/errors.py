"""The exceptions s3r raises for bad input: one line that names the file, key, flag or value at fault."""


class S3RError(Exception):
    """A user-facing error (bad file, key, flag or data) whose one-line message names the culprit."""


class ConfigError(S3RError, ValueError):
    """An impossible Wav2Vec2Config or RouteConfig (a ValueError too, for code that catches those)."""


class ShapeError(S3RError, ValueError):
    """A tensor of the wrong shape handed to the model."""
