"""CLI verbs: compose (being built)."""
