"""CLI verbs: adapters (being built)."""
