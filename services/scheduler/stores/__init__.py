"""State back-ends, one module per back-end (issue 20 moves SQLite and memory here too)."""
