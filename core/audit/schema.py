"""The audit store's tables, and the additive migration that lets a store written before keep working.

- `audit_decisions`: the decision chain, one row per decision (seq, every field, prev_hash, record_hash, and
  `mac` for rows written under the keyed rule; `ood_score` and `ood`, the out-of-distribution score and verdict,
  null for rows written before them).
- `audit_outcome_events`: the outcome chain, one row per outcome report in arrival order (corrections too),
  each with the reporting key id, its reason, its own prev_hash, record_hash and mac.
- `audit_serving_events`: the serving chain, one row per change of who serves (a promotion, a rollout step, a hold,
  a rollback, a split a server applied, a server's failure counts): time, actor, reason, the split after it and
  the evidence it rested on (core/audit/serving_events.py), chained and keyed like the others.
- `audit_head`: one row per chain (HEAD_DECISIONS, HEAD_OUTCOMES, HEAD_SERVING): the newest seq and hash, the retention anchor
  (where verification starts), the format marker (`format`: 1 plain, 2 keyed; `keyed_from`: the first seq
  written under the keyed rule), the key ids that wrote it and the head's own MAC.

A store written before these columns existed gets them added (nullable) when it is opened; its rows keep
verifying under the rule they were written with. Stores older than the outcome events table had a table of the
latest outcome per decision (`audit_outcomes`); its rows are copied once into the events as the outcome chain's
unchained prefix.
"""

from __future__ import annotations

from typing import Any

HEAD_DECISIONS, HEAD_OUTCOMES, HEAD_SERVING = 1, 2, 3
PLAIN, KEYED = 1, 2
LEGACY_OUTCOMES = "audit_outcomes"


def tables(sa: Any) -> tuple[Any, Any, Any, Any]:
    """(metadata, decisions, head, outcome events); the serving events table joins the same metadata."""
    seq_type = sa.BigInteger().with_variant(sa.Integer, "sqlite")
    meta = sa.MetaData()
    decisions = sa.Table(
        "audit_decisions", meta,
        sa.Column("seq", seq_type, primary_key=True, autoincrement=False),
        sa.Column("decision_id", sa.String(64), nullable=False, unique=True),
        sa.Column("time", sa.String(40), nullable=False, index=True),
        sa.Column("spec", sa.String(128), nullable=False, index=True),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False, index=True),
        sa.Column("variant", sa.String(16), nullable=False, index=True),
        sa.Column("input_hash", sa.String(64), nullable=False),
        sa.Column("inputs", sa.Text, nullable=False),
        sa.Column("probability", sa.Float(precision=53), nullable=False),
        sa.Column("decision", sa.Integer, nullable=False),
        sa.Column("threshold", sa.Float(precision=53), nullable=False),
        sa.Column("top_factors", sa.Text, nullable=False),
        sa.Column("similar_cases", sa.Text, nullable=False),
        sa.Column("latency_ms", sa.Float(precision=53), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=True),
        # The notice sent with an adverse decision: added later, so nullable (core/audit/records.OPTIONAL_FIELDS).
        sa.Column("notice_template_version", sa.String(32), nullable=True),
        sa.Column("notice_sha256", sa.String(64), nullable=True),
        sa.Column("notice", sa.Text, nullable=True),
        sa.Column("ood_score", sa.Float(precision=53), nullable=True),
        sa.Column("ood", sa.Integer, nullable=True),
    )
    head = sa.Table(
        "audit_head", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", seq_type, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("anchor_seq", seq_type, nullable=False),
        sa.Column("anchor_hash", sa.String(64), nullable=False),
        sa.Column("format", sa.Integer, nullable=True),
        sa.Column("keyed_from", seq_type, nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("enc_key_id", sa.String(32), nullable=True),
        sa.Column("mac", sa.String(64), nullable=True),
    )
    events = sa.Table(
        "audit_outcome_events", meta,
        sa.Column("id", seq_type, primary_key=True, autoincrement=False),
        sa.Column("decision_id", sa.String(64), nullable=False, index=True),
        sa.Column("seq", seq_type, nullable=False),
        sa.Column("spec", sa.String(128), nullable=False, index=True),
        sa.Column("outcome", sa.Integer, nullable=False),
        sa.Column("at", sa.String(40), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("correction", sa.Integer, nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=True),
        sa.Column("record_hash", sa.String(64), nullable=True),
        sa.Column("mac", sa.String(64), nullable=True),
    )
    serving_table(sa, meta, seq_type)
    return meta, decisions, head, events


def serving_table(sa: Any, meta: Any, seq_type: Any) -> Any:
    """`audit_serving_events` (core/audit/serving_events.py): who served when, and why."""
    return sa.Table(
        "audit_serving_events", meta,
        sa.Column("id", seq_type, primary_key=True, autoincrement=False),
        sa.Column("time", sa.String(40), nullable=False, index=True),
        sa.Column("spec", sa.String(128), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("mode", sa.String(16), nullable=True),
        sa.Column("share", sa.Float(precision=53), nullable=True),
        sa.Column("champion", sa.String(64), nullable=True),
        sa.Column("challenger", sa.String(64), nullable=True),
        sa.Column("rollout", sa.String(64), nullable=True),
        sa.Column("step", sa.Integer, nullable=True),
        sa.Column("seq_at", seq_type, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=True),
    )


def migrate(sa: Any, engine: Any, meta: Any) -> None:
    """Create what is missing: tables, then columns (nullable) and indexes of tables written before them."""
    meta.create_all(engine)
    inspector = sa.inspect(engine)
    for table in meta.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in (c for c in table.columns if c.name not in have):
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
            except sa.exc.DBAPIError:
                if column.name not in {c["name"] for c in sa.inspect(engine).get_columns(table.name)}:
                    raise  # not another process adding it first
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                with engine.begin() as conn:
                    index.create(conn, checkfirst=True)
