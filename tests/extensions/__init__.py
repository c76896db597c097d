"""One new file per extension, as docs/extending.md describes (registered by test_extending)."""
