"""What a notice adds to one adverse decision on the server: rendering the shipped credit_risk template in its
sandbox (`core.notices.generate_notice`: the reasons chosen from the top factors, the applicant's values made inert,
Jinja with autoescape, the text tidied) and hashing it, the fastest of several rounds.

    PYTHONPATH=. .venv/bin/python benchmarks/notice_render.py [rounds] [notices_per_round]
"""

import hashlib
import statistics
import sys
import time
from pathlib import Path

from assets.notice_gate import template_of
from assets.spec import load_spec
from core.notices.template import NoticeRequest, generate_notice

REPO = Path(__file__).resolve().parents[1]
FACTORS = [{"feature": "debt_to_income", "value": 31.0, "contribution": 0.12},
           {"feature": "inquiries_last_12m", "value": 14.0, "contribution": 0.08},
           {"feature": "term", "value": 60.0, "contribution": 0.05},
           {"feature": "annual_income", "value": 8.0, "contribution": -0.02}]


def main(rounds: int, per_round: int) -> None:
    loaded = load_spec(REPO / "pipelines" / "credit_risk.yaml")
    template = template_of(loaded)
    template.compiled()  # the server parses it once, when the alias moves
    spec = loaded.spec
    applicant = {**{c: 12.0 for c in spec.features.numeric}, **{c: "individual" for c in spec.features.categorical},
                 "loan_amount": 28000, "emp_title": "warehouse associate"}
    request = NoticeRequest(decision_id="8c1f0e2a9d4b4e37", date="2026-11-29", factors=FACTORS, applicant=applicant,
                            typical={c: 10.0 for c in spec.features.numeric})
    text = generate_notice(template, request).text
    for _ in range(200):
        generate_notice(template, request)

    def timed(fn) -> list[float]:
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            out.append((time.perf_counter() - start) / per_round * 1e6)
        return out

    render = timed(lambda: generate_notice(template, request))
    digest = timed(lambda: hashlib.sha256(text.encode()).hexdigest())
    print(f"notice: {len(text)} characters, {len(generate_notice(template, request).citations)} reasons")
    print(f"render (generate_notice): min {min(render):.1f} us, median {statistics.median(render):.1f} us")
    print(f"sha256 of the text:       min {min(digest):.1f} us, median {statistics.median(digest):.1f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7, int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
