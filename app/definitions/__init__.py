"""Pipeline files: loading, validation, runtime inputs and expressions."""

from app.definitions.loader import Bundle, choose_pipeline, load, resolve

__all__ = ["Bundle", "choose_pipeline", "load", "resolve"]
