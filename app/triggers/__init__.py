"""Webhook triggers (``kind: Trigger``): the document (``app.triggers.model``) and what a
delivery does with it (``app.triggers.webhook``)."""

from app.triggers.model import Trigger, TriggerSpec, load_text
from app.triggers.webhook import DeliveryError, delivery_id, inputs_of, signature, signed, unmet

__all__ = [
    "DeliveryError",
    "Trigger",
    "TriggerSpec",
    "delivery_id",
    "inputs_of",
    "load_text",
    "signature",
    "signed",
    "unmet",
]
