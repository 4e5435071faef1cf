"""Host-level chaos: faults injected into real lab hosts while a pipeline runs."""
