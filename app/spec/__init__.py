"""Pipeline files: loading, validation, runtime inputs and expressions."""

from app.spec.loader import Bundle, choose_pipeline, load, resolve

__all__ = ["Bundle", "choose_pipeline", "load", "resolve"]
