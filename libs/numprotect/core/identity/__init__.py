"""Who is calling, what they may do, and the trail they leave (docs/security.md).

`principal` (roles and principals), `api_keys` (bearer tokens stored as keyed hashes), `directory` (each
process's in-memory copy of the keys and of which carrier routes which block, refreshed in the background so
that checking a caller costs no Redis round trip), `policy` (the one table: method → roles → scope, fail closed),
`audit` (the append-only, hash-chained audit log), `layer` (the call-layer concern that authenticates and
authorizes every call once, and the `Callers` servicers ask for the caller's scope).
"""
