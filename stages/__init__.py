"""CLI stages: one module per stage plus the click group; the only layer that knows click."""
