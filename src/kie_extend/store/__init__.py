"""The Redis job store: key names, the Lua library, records (store/record.py parses one into typed fields) and their one transition, invariants."""
