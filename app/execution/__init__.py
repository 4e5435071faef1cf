"""Worker-side execution: what a region worker does with a step (tasks/ are its entry points)."""
