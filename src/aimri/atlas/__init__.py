"""Feature atlas: per-feature statistics, examples and labels, stored in one SQLite file."""
