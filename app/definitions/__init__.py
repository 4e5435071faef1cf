"""Pipeline files: loading, validation, runtime inputs and expressions."""

from app.definitions.bundle import Bundle
from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve

__all__ = ["Bundle", "choose_pipeline", "load", "resolve"]
