"""Credits, KIE's money: prices (the estimate), the ledger of every job's reservation and charge by tenant and operation, budgets, and reconciliation with the provider's balance."""
