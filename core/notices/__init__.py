"""Notices to the people decided about (Dagster-free: the server renders them, the `notices` asset checks them).

- `template`: the notice template as one document (the Jinja text and the context it renders with: the reason
  table, the lender, how many factors and reasons, which decisions are adverse), its sha256, the sandboxed
  renderer and `generate_notice`, the one way a notice is made.
- `reasons`: which reasons one decision's top factors give (direction, groups, order).
- `checks`: the pure checks the `notices` asset's blocking checks run (faithfulness, sensitive attributes,
  disclosures, readability, length, hostile applicant text).
- `registry`: the template in MLflow's prompt registry: registered only when its content changes, loaded by
  alias or version with its sha256 checked.
"""

from core.notices.reasons import Citation, cite
from core.notices.template import (Notice, NoticeRequest, NoticeTemplate, NoticeTemplateError, generate_notice, inert,
                                   notice_sha256)

__all__ = ["Citation", "Notice", "NoticeRequest", "NoticeTemplate", "NoticeTemplateError", "cite", "generate_notice",
           "inert", "notice_sha256"]
