"""One repository module per record kind: the SQL that reads and writes it, and nothing else."""
