"""The Redis job store: key names, the Lua library, records and their one transition, invariants."""
