"""The abstract base types of every component role."""
