"""The allocation service: 700 number pools: blocks, reservations, locks and per-number history."""
