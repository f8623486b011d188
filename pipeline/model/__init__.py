"""Data types every layer shares: pose records, frame slots, statistics."""
