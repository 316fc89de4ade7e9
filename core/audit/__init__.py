"""The decision audit log (`store`), what a record is (`records`), its keys (`crypto`), the outcome chain's rules
(`outcomes`), checkpoints kept outside it (`checkpoints`), verification (`verify`) and what counts as traffic
(`traffic`)."""

from core.audit.checkpoints import ANCHOR_METADATA, Checkpoint
from core.audit.crypto import ENC_KEY_FILE, MAC_KEY_FILE, AuditKeyError, AuditKeys
from core.audit.outcomes import (DEFAULT_OUTCOME_RULE, OUTCOME_RULES, OutcomeConflict, OutcomeEvent, OutcomeReport,
                                 UnknownDecision)
from core.audit.records import (DEFAULT_RETENTION_DAYS, GENESIS, OOD_FLAGGED, OOD_IN, OOD_REFUSED, REDACTED,
                                VARIANTS, AuditError, AuditRecord, ChainVerification, canonical_json, input_hash,
                                now_iso, redact)
from core.audit.store import AuditStore, default_audit_url

__all__ = ["ANCHOR_METADATA", "DEFAULT_OUTCOME_RULE", "DEFAULT_RETENTION_DAYS", "ENC_KEY_FILE", "GENESIS",
           "MAC_KEY_FILE", "OOD_FLAGGED", "OOD_IN", "OOD_REFUSED", "OUTCOME_RULES", "REDACTED", "VARIANTS", "AuditError", "AuditKeyError", "AuditKeys",
           "AuditRecord", "AuditStore", "ChainVerification", "Checkpoint", "OutcomeConflict", "OutcomeEvent",
           "OutcomeReport", "UnknownDecision", "canonical_json", "default_audit_url", "input_hash", "now_iso",
           "redact"]
