"""What passes share about a Relax module (today: statistics for dumps and reports)."""
