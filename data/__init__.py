"""What flows in: TFDS builders (ArrayRecord), tokenizers and deterministic Grain pipelines."""


class DatasetUnavailable(FileNotFoundError):
    """A dataset's source cannot be found, fetched or read: a user error, not a bug.

    Defined here, with no imports, so that the CLI can catch it without loading TFDS.
    """
