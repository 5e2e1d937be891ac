"""Errors that name the request field at fault, so every edge (CLI, HTTP) can report it."""

from __future__ import annotations


class FieldError(ValueError):
    """A request value is out of range for the model or policy it meets."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
