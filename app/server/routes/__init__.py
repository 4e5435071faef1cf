"""One module per resource, each an ``APIRouter`` named ``router`` (``create_app`` includes
them). Every route takes its caller from ``deps.require(PERMISSION)``; only health is open."""
