"""What every package of cradle shares and none owns: logging, JSON output, durable files,
process handling. The bottom layer: it imports no other cradle package."""
