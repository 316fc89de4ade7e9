"""The decision audit log (`store`), what a record is (`records`) and what counts as traffic (`traffic`)."""

from core.audit.records import (DEFAULT_RETENTION_DAYS, GENESIS, REDACTED, VARIANTS, AuditError, AuditRecord,
                                ChainVerification, canonical_json, input_hash, now_iso, redact)
from core.audit.store import AuditStore, default_audit_url

__all__ = ["DEFAULT_RETENTION_DAYS", "GENESIS", "REDACTED", "VARIANTS", "AuditError", "AuditRecord", "AuditStore",
           "ChainVerification", "canonical_json", "default_audit_url", "input_hash", "now_iso", "redact"]
