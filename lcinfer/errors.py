"""Errors a user can act on. Each message says what is wrong and what to do about it."""


class LcinferError(Exception):
  """Base class of every error lcinfer raises on purpose."""


class ConfigError(LcinferError, ValueError):
  """A model or experiment config is invalid or unsupported."""


class CheckpointError(LcinferError):
  """A checkpoint directory is missing, incomplete, corrupt, or of an unsupported format."""


class CapacityError(LcinferError, ValueError):
  """A prompt (plus the tokens to generate) does not fit the cache capacity or the model."""


class OutputExistsError(LcinferError, FileExistsError):
  """An output directory already exists and `force` was not given."""
