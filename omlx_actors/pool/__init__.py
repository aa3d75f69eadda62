"""Several models at once: a pool of runtimes (each its own engine) within one memory budget.

`policy` is the pure ledger and its decisions; `catalog` names and prices the models;
`actor` is the pool actor and `open_pool`, the in-process API.
"""
