"""Several models at once: a pool of runtimes (each its own engine) within one memory budget.

`policy` is the pure ledger and its decisions; `catalog` names and prices the models;
`actor` is the pool actor; `api` has `open_pool` and `ModelPool`, the in-process API.
"""
