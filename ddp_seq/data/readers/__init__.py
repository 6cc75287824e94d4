"""The built-in data: file formats, tokenizers, encodings and synthetic tasks, read into
``SequenceData`` (see README.md)."""
